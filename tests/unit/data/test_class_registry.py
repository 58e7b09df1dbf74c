"""When a retrain should not train: nothing new, or too little to learn from and score."""

from pathlib import Path

from components.data.catalog import Catalog
from components.training.planning import retrain_skip_reason


def catalog_with(classes: dict[str, tuple[str, int]]) -> Catalog:
    """classes: name -> (split, images)."""
    cat = Catalog(path=Path("/nonexistent/catalog.sqlite"), arrivals={"a1": {}})
    for name, (split, n) in classes.items():
        cat.classes[name] = {"arrival": "a1", "split": split}
        for i in range(n):
            role = "unseen" if split == "unseen" else ("query" if i == 0 else "train")
            cat.images[f"{name}/{i}.png"] = {"class": name, "arrival": "a1", "role": role}
    return cat


def test_empty_catalog_has_nothing_to_learn():
    assert retrain_skip_reason(Catalog(path=Path("x")), None)[0] == "nothing_new"


def test_same_arrivals_as_the_newest_model_are_not_trained_again():
    cat = catalog_with({"a": ("train", 4), "b": ("train", 4), "u": ("unseen", 3), "v": ("unseen", 3)})
    assert retrain_skip_reason(cat, None) is None
    assert retrain_skip_reason(cat, ["a1"])[0] == "nothing_new"


def test_one_trained_class_is_not_enough():
    status, message = retrain_skip_reason(
        catalog_with({"a": ("train", 4), "u": ("unseen", 3), "v": ("unseen", 3)}), None
    )
    assert status == "insufficient_data" and "at least 2" in message


def test_a_single_scorable_unseen_class_would_score_a_meaningless_recall():
    # one unseen class: every neighbour is "right", Recall@1 would be 1.0 whatever the model
    cat = catalog_with({"a": ("train", 4), "b": ("train", 4), "u": ("unseen", 3), "v": ("unseen", 1)})
    status, message = retrain_skip_reason(cat, None)
    assert status == "insufficient_data" and "1 unseen class(es) with 2+ images" in message
