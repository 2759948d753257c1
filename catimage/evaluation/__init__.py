"""Judging a policy offline: the figures of one evaluation (`figures`), intervals and the verdict
(`confidence`), label noise (`noise`), trials over re-drawn splits (`trials`), and the report files
(`report`, `plot`, `gallery`, `html`)."""
