from pathlib import Path

import pytest

from tunesmith.recipe import Recipe, RecipeError, load_recipe, recipe_from_dict, reference, to_yaml


def test_defaults_work_and_overrides_apply(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: x\ntrain:\n  lr: 1.0e-3\nmethod:\n  lora:\n    rank: 4\n")
    r = load_recipe(path, ["train.lr=5e-4", "method.lora.targets=[q_proj,v_proj]", "data.packing=false",
                           "train.steps=7", "model.dtype=bf16"])
    assert r.name == "x" and r.train.lr == 5e-4 and r.method.lora.rank == 4
    assert r.method.lora.targets == ["q_proj", "v_proj"]
    assert r.data.packing is False and r.train.steps == 7 and r.model.dtype == "bf16"
    assert r.train.batch_tokens == Recipe().train.batch_tokens  # untouched default


def test_unknown_key_names_the_nearest(tmp_path):
    with pytest.raises(RecipeError, match="train.lrr.*did you mean `lr`"):
        load_recipe(None, ["train.lrr=1"])
    path = tmp_path / "r.yaml"
    path.write_text("methd:\n  name: lora\n")
    with pytest.raises(RecipeError, match=r"r\.yaml.*unknown recipe key `methd`.*`method`"):
        load_recipe(path)


def test_bad_value_names_field_and_allowed_values():
    with pytest.raises(RecipeError, match="method.name: 'lorra' is not allowed; choose one of lora, full"):
        recipe_from_dict({"method": {"name": "lorra"}})
    with pytest.raises(RecipeError, match="train.steps: expected an integer"):
        load_recipe(None, ["train.steps=many"])
    with pytest.raises(RecipeError, match="train.lr: must be > 0"):
        load_recipe(None, ["train.lr=0"])
    with pytest.raises(RecipeError, match="data.overflow"):
        load_recipe(None, ["data.overflow=wrap"])
    with pytest.raises(RecipeError, match="key=value"):
        load_recipe(None, ["train.lr"])


def test_missing_recipe_file():
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe("nope.yaml")


def test_yaml_round_trip_and_reference(tmp_path):
    r = load_recipe(None, ["name=abc", "train.grad_accum=3"])
    path = tmp_path / "resolved.yaml"
    path.write_text(to_yaml(r))
    assert load_recipe(path) == r
    keys = {k for k, _, doc in reference()}
    assert {"train.lr", "method.lora.rank", "data.max_length", "model.name"} <= keys
    assert all(doc for _, _, doc in reference()), "every field has a doc line"


@pytest.mark.parametrize("name", sorted(p.name for p in (Path(__file__).parent.parent / "recipes").glob("*.yaml")))
def test_shipped_recipes_load(name):


    load_recipe(Path(__file__).parent.parent / "recipes" / name)


def test_readme_documents_every_recipe_key():


    readme = (Path(__file__).parent.parent / "README.md").read_text()
    for key, default, doc in reference():
        assert f"| `{key}` | `{default}` | {doc} |" in readme, f"README recipe reference is stale for {key}"
