import pytest

from dino_recog.data.demo import generate


@pytest.fixture(scope="session")
def small_demo(tmp_path_factory):
    """A small demo set (Market-1501 layout + unlabeled pool), generated once per test session."""
    root = tmp_path_factory.mktemp("demo")
    generate(root, seed=3, train_ids=30, test_ids=15, unlabeled_ids=16, distractors=4, junk=2)
    return root


@pytest.fixture(scope="session")
def demo_set(tmp_path_factory):
    """The full default demo set (about 5,000 images, ~10 s to generate), once per test session."""
    from dino_recog.data.demo import ensure_demo

    return ensure_demo(tmp_path_factory.mktemp("full") / "demo")
