"""The fitted router: the one fit pipeline and the router bundle (`router_model`), and adding a
candidate to a fitted router from a few labels (`add_candidate`). The estimators themselves are in
`catimage.estimators`."""
