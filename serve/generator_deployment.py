"""The Generator deployment: one candidate's text-to-image model behind Ray Serve, and the name
of the Serve deployment that draws a candidate."""

# No `from __future__ import annotations` here, as in serve/app.py: Ray Serve and FastAPI read
# annotations at runtime.
import asyncio
import io
import logging
import time
from typing import Any

from ray import serve

log = logging.getLogger("catimage.serve")


def deployment_name(candidate: str) -> str:
    """The Serve deployment that draws `candidate` (Serve forbids '#' in names)."""
    return "Generator-" + candidate.replace("#", "_")


PNG_COMPRESS_LEVEL = 1
"""zlib level of the PNGs served: PNG is lossless at every level (the pixels are the same), and level
1 encodes faster than Pillow's default 6 for slightly larger files."""


def _png_bytes(image: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buf.getvalue()


@serve.deployment
class Generator:
    """One candidate's text-to-image model. Returns PNG bytes, or None when the caller wants none.

    In-process pipelines are drawn one call at a time per replica (a diffusers pipeline keeps
    per-call scheduler state), so concurrency comes from replicas; with `max_batch_size > 1`
    concurrent requests are drawn as one batch through `@serve.batch`. Hosted (http) generators
    are I/O-bound and thread-safe, so their calls run concurrently.

    When the caller gives up (the router's `request_timeout_s`), Serve cancels the request here:
    the pipeline is told to stop after its current denoising step (diffusers' `_interrupt`) and
    the replica takes the next request as soon as that step ends, instead of finishing a drawing
    nobody waits for.
    """

    def __init__(
        self, candidate: str, spec: dict[str, Any], device: str | None = None,
        max_batch_size: int = 1, batch_wait_timeout_s: float = 0.01, warmup: bool = False,
    ) -> None:
        from catimage.generators import make_generator
        from catimage.generators.spec import parse_generator_spec

        self.candidate = candidate
        self._generator = make_generator(parse_generator_spec(spec), device=device)
        self._exclusive = getattr(self._generator, "pipe", None) is not None
        self._text_features = self._generator.text_features
        self._lock = asyncio.Lock()
        self._stats = {"requests": 0, "batches": 0, "largest_batch": 0, "interrupted": 0, "busy": 0, "unet_steps": 0,
                       "given_tokens": 0, "warmup_steps": self._warm_up() if warmup else 0}
        unet = getattr(getattr(self._generator, "pipe", None), "unet", None)
        if unet is not None:  # a denoising step is one UNet call: what an interruption saves is countable
            unet.register_forward_hook(self._count_step)
        self._batched = max_batch_size > 1
        if self._batched:
            self._draw_batch.set_max_batch_size(max_batch_size)
            self._draw_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        log.info("generator %s ready (max_batch_size=%d)", candidate, max_batch_size)

    def _draw(self, prompts: list[str], seeds: list[int], tokens: list[Any] | None = None) -> list[Any]:
        self._stats["batches"] += 1
        self._stats["largest_batch"] = max(self._stats["largest_batch"], len(prompts))
        self._stats["busy"] += 1
        given = sum(t is not None for t in tokens or [])
        self._stats["given_tokens"] += given
        try:
            if given:
                images = self._generator.generate(prompts, seeds, prompt_tokens=tokens)
            else:
                images = self._generator.generate(prompts, seeds)
        finally:
            self._stats["busy"] -= 1
        if len(images) != len(prompts):
            raise RuntimeError(f"generator {self.candidate} returned {len(images)} images for {len(prompts)} prompts")
        return images

    def _warm_up(self) -> int:
        """Before the replica reports ready (before the step counter is hooked): a first call's lazy
        loads would otherwise land on the first requests, in the middle of a burst that scaled it up."""
        start = time.perf_counter()
        steps = self._generator.warm_up()
        if steps:
            log.info("generator %s warmed up in %.2f s", self.candidate, time.perf_counter() - start)
        return steps

    def _count_step(self, *_: Any) -> None:
        self._stats["unet_steps"] += 1

    def _interrupt(self) -> None:
        pipe = getattr(self._generator, "pipe", None)
        if pipe is not None:
            pipe._interrupt = True  # diffusers checks it before every denoising step

    async def _draw_cancellable(self, prompts: list[str], seeds: list[int], tokens: list[Any] | None) -> list[Any]:
        """Draw in a thread; if this request is cancelled, stop the pipeline and wait for the thread
        (so the pipeline is never used by two threads), then let the cancellation through."""
        task = asyncio.ensure_future(asyncio.to_thread(self._draw, prompts, seeds, tokens))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            self._stats["interrupted"] += 1
            while not task.done():
                # Re-assert: a pipeline call that had not started yet resets the flag when it does.
                self._interrupt()
                await asyncio.wait({task}, timeout=0.05)
            raise

    def _draw_encoded(self, items: list[tuple[str, int, bool, Any]]) -> list[bytes | None]:
        """One generate() call for the batch, and the PNGs of those who want one, in one thread hop."""
        images = self._draw([p for p, _, _, _ in items], [s for _, s, _, _ in items], [t for _, _, _, t in items])
        return [_png_bytes(image) if want else None for image, (_, _, want, _) in zip(images, items)]

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _draw_batch(self, items: list[tuple[str, int, bool, Any]]) -> list[bytes | None]:
        return await asyncio.to_thread(self._draw_encoded, items)

    def stats(self) -> dict[str, Any]:
        """Requests and generate() calls this replica served, and where it draws (`.stats.remote()`)."""
        return {**self._stats, "device": str(getattr(self._generator, "device", "remote"))}

    def text_features(self) -> dict[str, Any] | None:
        """The text encoder whose per-token features a draw may bring (`tokens`), or None: a router
        that computed them for its decision hands them over instead of this replica encoding again."""
        return self._text_features

    async def draw_many(self, items: list[tuple]) -> list[bytes | None]:
        """Several draws a router sent as one call (serve/drawing.py CallBatcher): each is drawn as if
        it came alone, so they join this replica's batches together; in order. An item is (prompt,
        seed, want_image) or (prompt, seed, want_image, tokens)."""
        return list(await asyncio.gather(*(self(*item) for item in items)))

    async def __call__(self, prompt: str, seed: int, want_image: bool = True, tokens: Any = None) -> bytes | None:
        """`tokens`: the prompt's `text_features` tokens, (T, d) float32, or None (encoded here)."""
        self._stats["requests"] += 1
        if tokens is not None and self._text_features is None:
            tokens = None  # a generator that encodes its own prompts ignores them
        if self._batched:
            return await self._draw_batch((prompt, seed, want_image, tokens))
        if self._exclusive:
            async with self._lock:
                image = (await self._draw_cancellable([prompt], [seed], [tokens]))[0]
        else:
            image = (await asyncio.to_thread(self._draw, [prompt], [seed], [tokens]))[0]
        if not want_image:
            return None
        return await asyncio.to_thread(_png_bytes, image)
