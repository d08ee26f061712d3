from tests.helpers import TIMM_RESULTS, need
from tinysaver.catalog import PAPER_POOL, catalog_entries
from tinysaver.models import resolve_kind


def test_catalog_has_the_paper_pool_with_published_numbers():
    need(TIMM_RESULTS.is_dir(), "../shared/data/timm-results")
    entries = catalog_entries(TIMM_RESULTS)
    assert len(entries) == len(PAPER_POOL) == 45
    r50 = entries["resnet50.tv_in1k"]["published"]
    assert abs(r50["top1"] - 76.1) < 0.2 and abs(r50["gmacs"] - 4.11) < 0.01  # torchvision's ResNet-50
    for name, e in entries.items():
        assert e["macs"] > 0 and e["params"] > 0 and 0.5 < e["accuracy"]["imagenet-val (published)"] < 0.9
        assert "timm results" in e["published"]["source"]


def test_profile_accepts_every_catalog_name():
    for arch, tag in PAPER_POOL.items():
        assert resolve_kind(f"{arch}.{tag}") == "timm"


def test_bundled_catalog_zoo_matches_the_tables():
    need(TIMM_RESULTS.is_dir(), "../shared/data/timm-results")
    from tinysaver.zoo import load_zoo

    zoo = load_zoo("imagenet-catalog")
    assert {m["status"] for m in zoo.models.values()} == {"published"}
    fresh = catalog_entries(TIMM_RESULTS)
    assert {k: v["macs"] for k, v in zoo.models.items()} == {k: v["macs"] for k, v in fresh.items()}
