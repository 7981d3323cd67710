"""Random streams that cannot collide: a seed derives from the whole identity, and every draw has its own."""

import models


def test_identities_sharing_a_long_prefix_get_different_seeds():
    assert models.unit_seed(0, "hessian-poison") != models.unit_seed(0, "hessian-probes")
    assert models.unit_seed(0, "ab", "c") != models.unit_seed(0, "a", "bc")  # parts do not run into each other
    assert models.unit_seed(0, "x") != models.unit_seed(1, "x")
    assert models.unit_seed(3, "poison", 0.3, 1) == models.unit_seed(3, "poison", 0.3, 1)


def test_every_identity_in_use_maps_to_its_own_seed_and_is_drawn_at_one_place(smoke_results):
    """Every draw of both scripts' smoke runs (every part): distinct identities get distinct seeds, and an identity
    asked for at two places in the code would be two draws sharing one random stream."""
    _, seen = smoke_results
    seeds = {identity: {value for value, _ in uses} for identity, uses in seen.items()}
    assert len(seen) > 100 and all(len(values) == 1 for values in seeds.values())
    assert len({next(iter(v)) for v in seeds.values()}) == len(seeds)
    shared = {identity: sorted({site for _, site in uses}) for identity, uses in seen.items()
              if len({site for _, site in uses}) > 1}
    assert not shared, list(shared.items())[:3]
