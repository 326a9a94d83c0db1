import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from dino_recog import cli
from dino_recog import config as C
from dino_recog.config import constraints as L

ROOT = Path(__file__).resolve().parents[1]


def leaf_keys(obj, prefix=""):
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            yield from leaf_keys(v, f"{prefix}{f.name}.")
        elif isinstance(v, list) and v and dataclasses.is_dataclass(v[0]):
            yield from leaf_keys(v[0], f"{prefix}{f.name}.")
        else:
            yield prefix + f.name


@pytest.mark.parametrize("name, cls", [("cfg_dino.yaml", C.DinoConfig), ("cfg_recog.yaml", C.RecogConfig),
                                       ("cfg_usl.yaml", C.UslConfig)])  # fmt: skip
def test_top_level_files_hold_every_key_with_a_comment_and_equal_the_defaults(name, cls):
    path = ROOT / name
    assert C.load(path, cls=cls) == cls()  # the file and the dataclass defaults cannot drift apart
    text = path.read_text()
    for key in leaf_keys(cls()):
        leaf = key.rsplit(".", 1)[-1]
        lines = [ln for ln in text.splitlines() if re.match(rf"\s*(- )?{leaf}:", ln)]
        assert lines, f"{name} lacks {key}"
        assert all("  # " in ln for ln in lines), f"{name}: {key} has no comment"


@pytest.mark.parametrize("path", sorted((ROOT / "configs").rglob("*.yaml")))
def test_presets_load(path):
    cls = C.DinoConfig if "dino" in path.name else C.UslConfig if path.name.startswith("usl_") else C.RecogConfig
    C.load(path, cls=cls)


def test_unknown_key_in_file_names_path_and_suggestion(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  epoch: 3\n")
    with pytest.raises(C.ConfigError, match=r"c\.yaml: unknown key train\.epoch; did you mean train\.epochs\?"):
        C.load(f, cls=C.DinoConfig)


def test_unknown_key_on_command_line():
    with pytest.raises(C.ConfigError, match=r"command line: unknown key train\.epoch; did you mean train\.epochs\?"):
        C.load(None, ["train.epoch=3"], cls=C.DinoConfig)
    with pytest.raises(C.ConfigError, match=r"unknown key modle\.arch; did you mean model\.arch\?"):
        C.load(None, ["modle.arch=vit_base"], cls=C.RecogConfig)
    with pytest.raises(C.ConfigError, match=r"unknown key data\.train\[0\]\.rot; did you mean data\.train\.root\?"):
        C.load(None, ["data.train[0].rot=/x"], cls=C.RecogConfig)


def test_wrong_type_names_key_value_and_type(tmp_path):
    with pytest.raises(C.ConfigError, match=r"train\.lr: expected float, got 'fast' \(str\)"):
        C.load(None, ["train.lr=fast"], cls=C.DinoConfig)
    with pytest.raises(C.ConfigError, match=r"train\.epochs: expected int, got 1\.5 \(float\)"):
        C.load(None, ["train.epochs=1.5"], cls=C.DinoConfig)
    with pytest.raises(C.ConfigError, match=r"model\.norm_last_layer: expected bool, got 'maybe' \(str\)"):
        C.load(None, ["model.norm_last_layer=maybe"], cls=C.DinoConfig)
    with pytest.raises(C.ConfigError, match=r"crops\.global_crops_size: expected a list of 2 values, got \[256\]"):
        C.load(None, ["crops.global_crops_size=[256]"], cls=C.DinoConfig)
    f = tmp_path / "c.yaml"
    f.write_text("model: vit_small\n")
    with pytest.raises(C.ConfigError, match=r"c\.yaml: model: expected a mapping of DinoModelConfig keys"):
        C.load(f, cls=C.DinoConfig)


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lr=-0.1", r"train\.lr: -0\.1; expected a value > 0"),
        ("crops.local_crops_size=[300,64]", r"crops\.local_crops_size: \[300, 64\] is larger than global_crops_size"),
        ("crops.global_crops_scale=[0.9,0.4]", r"crops\.global_crops_scale: \[0\.9, 0\.4\] is not a range"),
        ("model.arch=vit_huge", r"model\.arch: 'vit_huge' is not one of 'vit_tiny'"),
        ("train.warmup_epochs=200", r"train\.warmup_epochs: 200 is more than epochs 100"),
        ("dino.center_momentum=1.5", r"dino\.center_momentum: 1\.5; expected a value in \[0, 1\]"),
        ("data.train.name=imagenet", r"data\.train\.name: 'imagenet' is not one of"),
    ],
)
def test_impossible_values_are_refused_at_load(override, message):
    with pytest.raises(C.ConfigError, match=message):
        C.load(None, [override], cls=C.DinoConfig)


def test_recog_value_checks():
    with pytest.raises(C.ConfigError, match=r"loss: every loss weight is 0"):
        C.load(None, ["loss.ce_weight=0", "loss.triplet_weight=0"], cls=C.RecogConfig)
    with pytest.raises(C.ConfigError, match=r"model\.feature: 'cls' is not one of 'avg', 'gem'"):
        C.load(None, ["model.arch=resnet50"], cls=C.RecogConfig)
    with pytest.raises(C.ConfigError, match=r"loss\.distill_teacher: empty while distill_weight > 0"):
        C.load(None, ["loss.distill_weight=1"], cls=C.RecogConfig)
    with pytest.raises(C.ConfigError, match=r"loss\.partial_fc with loss\.distill_weight=1\.0: distillation reads "
                                            r"the logits of every class"):  # fmt: skip
        C.load(None, ["loss.partial_fc=true", "loss.distill_weight=1", "loss.distill_teacher=t.pth"], cls=C.RecogConfig)
    with pytest.raises(C.ConfigError, match=r"loss\.partial_fc: no loss with a classifier is on; expected one of "
                                            r"loss\.ce_weight, loss\.cosface_weight"):  # fmt: skip
        C.load(None, ["loss.partial_fc=true", "loss.ce_weight=0"], cls=C.RecogConfig)
    with pytest.raises(C.ConfigError, match=r"loss\.partial_fc_sample_rate: 0\.0; expected 0 < rate <= 1"):
        C.load(None, ["loss.partial_fc_sample_rate=0"], cls=C.RecogConfig)
    with pytest.raises(C.ConfigError, match=r"data\.train\[1\]: index out of range; data\.train has 1 entries"):
        C.load(None, ["data.train[1].root=/x"], cls=C.RecogConfig)


def test_precedence_defaults_then_file_then_command_line(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  lr: 1e-3\n  epochs: 17\n")  # 1e-3 is a string to PyYAML; accepted as float
    cfg = C.load(f, ["train.epochs=9", "train.warmup_epochs=2", "data.train.root=/data/lup"], cls=C.DinoConfig)
    assert cfg.train.lr == 1e-3 and cfg.train.epochs == 9 and cfg.data.train.root == "/data/lup"
    assert cfg.train.min_lr == C.DinoTrainConfig().min_lr  # untouched keys keep their defaults
    cfg = C.load(
        None,
        ["data.train=[{name: msmt17, root: /a}, {name: market1501, root: /b}]", "data.train[1].root=/c"],
        cls=C.RecogConfig,
    )
    assert [(s.name, s.root) for s in cfg.data.train] == [("msmt17", "/a"), ("market1501", "/c")]
    cfg = C.load(None, ["data.eval_set.name=market1501", "data.eval_set.root=/m"], cls=C.DinoConfig)
    assert cfg.data.eval_set == C.DatasetSpec(name="market1501", root="/m")


def test_save_round_trip(tmp_path):
    cfg = C.load(None, ["train.epochs=3", "train.warmup_epochs=1", "crops.local_crops_number=6"], cls=C.DinoConfig)
    C.save(cfg, tmp_path / "out" / "config.yaml")
    assert C.load(tmp_path / "out" / "config.yaml", cls=C.DinoConfig) == cfg
    assert not list((tmp_path / "out").glob(".*tmp*"))
    assert yaml.safe_load(C.dump(cfg))["crops"]["local_crops_number"] == 6


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(C.ConfigError, match=r"nope\.yaml: config file not found"):
        C.load(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(C.ConfigError, match=r"bad\.yaml: not valid YAML"):
        C.load(bad)
    with pytest.raises(C.ConfigError, match=r"override 'train\.lr': expected key\.sub=value"):
        C.load(None, ["train.lr"])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["dino.version=v3"], r"dino\.version: 'v3' is not one of 'v1', 'v2'"),
        (["dino.centering=mean"], r"dino\.centering: 'mean' is not one of 'center', 'sinkhorn_knopp'"),
        (["dino.mask_ratio_min_max=[0.5,0.1]"], r"dino\.mask_ratio_min_max: \[0\.5, 0\.1\] is not a range"),
        (["dino.mask_sample_probability=1.5"], r"dino\.mask_sample_probability: 1\.5; expected a value in \[0, 1\]"),
        (["train.layer_decay=0"], r"train\.layer_decay: 0\.0; expected a value in \(0, 1\]"),
        (["dino.version=v2", "model.arch=resnet50"], r"dino\.version: v2 masks patch tokens and needs a ViT"),
        (["dino.version=v2", "model.use_bn_in_head=true"], r"model\.use_bn_in_head: true with dino\.version v2"),
        (["model.arch=resnet50", "model.layerscale=1e-5"], r"model\.arch: resnet50 with layerscale"),
    ],
)
def test_dinov2_values_are_checked(overrides, message):
    with pytest.raises(C.ConfigError, match=message):
        C.load(None, overrides, cls=C.DinoConfig)


def test_dinov2_presets_hold_the_dinov2_defaults():
    cfg = C.load(ROOT / "configs/luperson/dinov2_vit_small.yaml", cls=C.DinoConfig)
    d, m, t = cfg.dino, cfg.model, cfg.train
    assert (d.version, d.momentum_teacher, d.warmup_teacher_temp, d.teacher_temp) == ("v2", 0.992, 0.04, 0.07)
    assert (d.warmup_teacher_temp_epochs, d.koleo_weight, d.ibot_weight) == (30, 0.1, 1.0)
    assert (d.mask_ratio_min_max, d.mask_sample_probability) == ((0.1, 0.5), 0.5)
    assert (m.layerscale, m.drop_path_rate, t.layer_decay, t.patch_embed_lr_mult) == (1e-5, 0.1, 0.9, 0.2)
    assert C.load(ROOT / "configs/demo/dinov2.yaml", cls=C.DinoConfig).dino.version == "v2"


# --------------------------------------------------------------------------------------------------------------------
# The declaration mechanism, on test-only schemas


@dataclasses.dataclass
class Part:
    name: str = L.choice("a", "b")
    weight: float = L.positive(1.0)
    low: float = 0.0
    high: float = 1.0

    def validate(self, path):
        if self.low > self.high:
            raise C.ConfigError(f"{path}.low: {self.low} is more than high {self.high}")


@dataclasses.dataclass
class Toy:
    parts: list[Part] = L.declare([Part()], L.Constraint(bool, "empty; expected a part"))
    single: Part = dataclasses.field(default_factory=Part)
    spare: Part | None = None
    size: tuple[int, int] = L.positive((2, 3))
    share: float = L.unit_interval(0.5, open_right=True)
    span: tuple[float, float] = L.range_pair((0.2, 0.4))
    count: int = L.non_negative(0)


@pytest.mark.parametrize(
    "values, overrides, message",
    [
        ({"parts": [{"name": "a"}, {"name": "c"}]}, [], r"^toy: parts\[1\]\.name: 'c' is not one of 'a', 'b'$"),
        ({"parts": [{}, {}]}, ["parts[1].weight=-2"], r"^toy \+ command line: parts\[1\]\.weight: -2\.0; expected a "
                                                      r"value > 0$"),
        ({"parts": []}, [], r"^toy: parts: empty; expected a part$"),
        ({"single": {"weight": 0}}, [], r"^toy: single\.weight: 0\.0; expected a value > 0$"),
        ({}, ["spare.name=z"], r"^toy \+ command line: spare\.name: 'z' is not one of 'a', 'b'$"),
        ({"size": [2, 0]}, [], r"^toy: size: 0; expected a value > 0$"),
        ({"share": 1}, [], r"^toy: share: 1\.0; expected a value in \[0, 1\)$"),
        ({"span": [0, 0.5]}, [], r"^toy: span: \[0\.0, 0\.5\] is not a range 0 < low <= high <= 1$"),
        ({"count": -1}, [], r"^toy: count: -1; expected a value >= 0$"),
        ({"parts": [{}, {"low": 2}]}, [], r"^toy: parts\[1\]\.low: 2\.0 is more than high 1\.0$"),  # own validate()
    ],
)  # fmt: skip
def test_declared_constraints_are_enforced_with_the_key_path(values, overrides, message):
    with pytest.raises(C.ConfigError, match=message):
        C.from_dict(Toy, values, "toy", overrides)


def test_declared_fields_keep_their_defaults():
    a, b = Toy(), Toy()
    assert a == C.from_dict(Toy, {}) and a.parts is not b.parts and a.parts[0] is not b.parts[0]  # copied, not shared
    assert (a.parts[0].name, a.size, a.share) == ("a", (2, 3), 0.5)
    assert C.from_dict(Toy, {"parts": [{"name": "b", "weight": 2}]}).parts == [Part(name="b", weight=2.0)]
    with pytest.raises(C.ConfigError, match=r"^spare\.weight: -1; expected a value > 0$"):
        C.validate(Toy(spare=Part(weight=-1)))  # also callable on a config built in code


# ---------------------------------------------------------------------------------------------------------------------
# Settings that cannot work (docs/reliability.md)


@pytest.mark.parametrize(
    "cls, override, message",
    [
        (C.DinoConfig, "crops.global_crops_size=[250,128]",
         r"crops\.global_crops_size: \[250, 128\] is not a multiple of model\.patch_size 16 .*e\.g\. \[256, 128\]"),
        (C.DinoConfig, "crops.local_crops_size=[4,4]", r"crops\.local_crops_size: \[4, 4\] is not a multiple of"),
        (C.RecogConfig, "aug.size=[256,100]", r"aug\.size: \[256, 100\] is not a multiple of model\.patch_size 16"),
        (C.RecogConfig, "data.num_instances=1",
         r"data\.num_instances: 1 with a triplet or centre loss; expected >= 2"),
        (C.RecogConfig, "data.num_identities=1", r"data\.num_identities: 1 with a triplet or centre loss"),
        (C.DinoConfig, "run.save_every_steps=-1", r"run\.save_every_steps: -1; expected a value >= 0"),
        (C.RecogConfig, "run.skip_nonfinite_steps=-2", r"run\.skip_nonfinite_steps: -2; expected a value >= 0"),
        (C.RecogConfig, "run.keep_last=0", r"run\.keep_last: 0; expected a value > 0"),
    ],
)  # fmt: skip
def test_impossible_settings_are_refused_at_load(cls, override, message):
    with pytest.raises(C.ConfigError, match=message):
        C.load(None, [override], cls=cls)


# ---------------------------------------------------------------------------------------------------------------------
# Hostile input (docs/reliability.md): each is one line naming the file or key, the value and what was expected


def test_a_binary_file_is_not_a_config(tmp_path):
    png = tmp_path / "weights.yaml"
    png.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    with pytest.raises(C.ConfigError) as e:
        C.load(png)
    assert str(e.value) == (
        f"{png}: not a UTF-8 YAML text file (byte 0x89 at offset 0 is not UTF-8); expected a YAML config"
    )
    zeros = tmp_path / "zeros.yaml"
    zeros.write_bytes(b"run:\n\x00\x00\x00")  # valid UTF-8, but no text
    with pytest.raises(C.ConfigError) as e:
        C.load(zeros)
    assert str(e.value) == (
        f"{zeros}: not a YAML text file (control character #x0000 at offset 5); expected a YAML config"
    )
    bom = tmp_path / "bom.yaml"
    bom.write_bytes(b"\xef\xbb\xbftrain:\n  epochs: 17\n")  # a UTF-8 byte-order mark is not content
    assert C.load(bom).train.epochs == 17


def test_a_bad_file_is_one_line_from_the_command_line(tmp_path):
    png = tmp_path / "weights.yaml"
    png.write_bytes(b"\x89PNG\r\n")
    with pytest.raises(SystemExit) as e:
        cli.load_config(C.DinoConfig, "cfg_dino.yaml", "test", argv=["--config", str(png)])
    assert e.value.code == f"config error: {png}: not a UTF-8 YAML text file (byte 0x89 at offset 0 is not UTF-8); " \
                           "expected a YAML config"  # fmt: skip


def test_a_yaml_syntax_error_is_one_line_naming_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: 0.1\n  epochs: [1, 2\nrun:\n  seed: 1\n")
    with pytest.raises(C.ConfigError) as e:
        C.load(bad)
    assert str(e.value) == (
        f"{bad}: not valid YAML at line 4, column 4: expected ',' or ']', but got ':' "
        "(while parsing a flow sequence from line 3, column 11)"
    )


@pytest.mark.parametrize(
    "text, message",
    [
        ("run:\n  seed: 1\ntrain:\n  lr: 0.1\nrun:\n  seed: 2\n", "key run given twice, at lines 1 and 5"),
        ("train:\n  lr: 0.1\n  epochs: 5\n  lr: 0.2\n", "key train.lr given twice, at lines 2 and 4"),
        ("data:\n  train:\n    - {name: msmt17, root: /a}\n    - name: market1501\n      root: /b\n      root: /c\n",
         "key data.train[1].root given twice, at lines 5 and 6"),
    ],
    ids=["top level", "in a section", "in a list item"],
)  # fmt: skip
def test_a_key_given_twice_in_a_file_is_an_error(tmp_path, text, message):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(C.ConfigError) as e:
        C.load(f, cls=C.RecogConfig)
    assert str(e.value) == f"{f}: {message}; expected each key once (the second would replace the first)"


def test_a_key_repeated_on_the_command_line_or_merged_in_a_file_is_not(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  <<: {lr: 0.1, epochs: 30}\n  lr: 0.2\n")  # a written key overrides a merged one
    cfg = C.load(f, ["train.epochs=9", "train.epochs=12"], cls=C.DinoConfig)  # the last override wins
    assert (cfg.train.lr, cfg.train.epochs) == (0.2, 12)


@pytest.mark.parametrize(
    "cls, override, message",
    [
        (C.DinoConfig, "run.seed=99999999999999999999",
         "run.seed: 99999999999999999999; expected an integer in [0, 4294967295] (2**32 - 1)"),
        (C.RecogConfig, "run.seed=-1", "run.seed: -1; expected an integer in [0, 4294967295] (2**32 - 1)"),
        (C.DinoConfig, "crops.global_crops_size=[100000,50000]",
         "crops.global_crops_size: [100000, 50000]; expected each side at most 4096 pixels"),
        (C.DinoConfig, "crops.local_crops_size=[64,8192]",
         "crops.local_crops_size: [64, 8192]; expected each side at most 4096 pixels"),
        (C.RecogConfig, "aug.size=[4112,128]", "aug.size: [4112, 128]; expected each side at most 4096 pixels"),
        (C.RecogConfig, "aug.padding=100000", "aug.padding: 100000; expected at most 4096 pixels"),
        (C.DinoConfig, "crops.std=[.inf,.inf,.inf]", "crops.std: [inf, inf, inf]; expected 3 finite values > 0"),
        (C.DinoConfig, "crops.std=[0,0,0]", "crops.std: [0.0, 0.0, 0.0]; expected 3 finite values > 0"),
        (C.DinoConfig, "crops.std=[-0.2,0.2,0.2]", "crops.std: [-0.2, 0.2, 0.2]; expected 3 finite values > 0"),
        (C.DinoConfig, "crops.mean=[.nan,0,0]", "crops.mean: [nan, 0.0, 0.0]; expected 3 finite values"),
        (C.RecogConfig, "aug.std=[.nan,1,1]", "aug.std: [nan, 1.0, 1.0]; expected 3 finite values > 0"),
        (C.RecogConfig, "aug.mean=[0,-.inf,0]", "aug.mean: [0.0, -inf, 0.0]; expected 3 finite values"),
        (C.DinoConfig, "train.lr=.inf", "train.lr: inf; expected a finite value > 0"),
        (C.DinoConfig, "train.lr=1e400", "train.lr: inf; expected a finite value > 0"),  # float() of a string
        (C.DinoConfig, "dino.teacher_temp=.nan", "dino.teacher_temp: nan; expected a finite value > 0"),
        (C.DinoConfig, "train.clip_grad=.inf", "train.clip_grad: inf; expected a finite value >= 0"),
        (C.RecogConfig, "loss.cosface_s=-.inf", "loss.cosface_s: -inf; expected a finite value > 0"),
        # sizes that allocate: a typo used to allocate for minutes and hang
        (C.DinoConfig, "model.out_dim=6553600", "model.out_dim: 6553600; expected at most 262144"),
        (C.DinoConfig, "model.hidden_dim=204800", "model.hidden_dim: 204800; expected at most 16384"),
        (C.DinoConfig, "model.depth=1200", "model.depth: 1200; expected at most 64"),
        (C.DinoConfig, "crops.local_crops_number=800", "crops.local_crops_number: 800; expected at most 64"),
        (C.DinoConfig, "data.batch_size_per_gpu=64000", "data.batch_size_per_gpu: 64000; expected at most 4096"),
        (C.DinoConfig, "eval.knn_k=200000", "eval.knn_k: 200000; expected at most 2048"),
        (C.RecogConfig, "data.test_batch_size=25600", "data.test_batch_size: 25600; expected at most 4096"),
        (C.RecogConfig, "data.num_workers=8000", "data.num_workers: 8000; expected at most 256"),
        (C.RecogConfig, "model.embedding_dim=1000000", "model.embedding_dim: 1000000; expected at most 16384"),
        (C.RecogConfig, "data.num_identities=1600",
         "data.num_identities: 1600 x num_instances 4 = 6400 images per process; expected at most 4096"),
    ],
)  # fmt: skip
def test_hostile_values_are_refused_naming_key_value_and_limit(cls, override, message):
    with pytest.raises(C.ConfigError) as e:
        C.load(None, [override], cls=cls)
    assert str(e.value) == f"defaults + command line: {message}"


def test_the_limits_themselves_are_accepted():
    cfg = C.load(None, ["run.seed=4294967295", "crops.global_crops_size=[4096,4096]"], cls=C.DinoConfig)
    assert (cfg.run.seed, cfg.crops.global_crops_size) == (2**32 - 1, (4096, 4096))
    sizes = ["model.out_dim=262144", "model.depth=64", "data.batch_size_per_gpu=4096", "crops.local_crops_number=64",
             "eval.knn_k=2048"]  # fmt: skip
    cfg = C.load(None, sizes, cls=C.DinoConfig)
    assert (cfg.model.out_dim, cfg.model.depth, cfg.data.batch_size_per_gpu) == (262144, 64, 4096)
    cfg = C.load(None, ["data.num_identities=1024", "data.num_instances=4"], cls=C.RecogConfig)
    assert cfg.data.num_identities * cfg.data.num_instances == 4096


def test_an_int_too_large_for_a_float_is_a_type_error_not_a_traceback():
    with pytest.raises(C.ConfigError, match=r"^command line: train\.lr: expected float, got 9+\.\.\.9+ \(int\)$"):
        C.load(None, ["train.lr=" + "9" * 400], cls=C.DinoConfig)
    with pytest.raises(C.ConfigError, match=r"^command line: override 'run\.seed=9+': value is not valid YAML"):
        C.load(None, ["run.seed=" + "9" * 5000], cls=C.DinoConfig)  # past Python's 4300-digit int limit


def test_a_yaml_alias_bomb_gives_a_short_error(tmp_path):
    """Six nested aliases of 8 make 262,144 strings from a 300-byte file; the error used to print them all (25 MB)."""
    levels = ["&a1 [x,x,x,x,x,x,x,x]"] + [f"&a{i} [{','.join([f'*a{i - 1}'] * 8)}]" for i in range(2, 7)]
    path = tmp_path / "bomb.yaml"
    path.write_text(f"train: {{milestones: [{', '.join(levels)}]}}\n")
    with pytest.raises(C.ConfigError) as e:
        C.load(path, [], cls=C.RecogConfig)
    assert (
        str(e.value)
        == f"{path}: train.milestones[0]: expected int, got ['x', 'x', 'x', 'x', 'x', 'x', 'x', 'x'] (list)"
    )
    assert len(str(e.value)) < 300


def test_the_same_training_set_listed_twice_is_refused(tmp_path):
    twice = f"data.train=[{{name: market1501, root: {tmp_path}/m}}, {{name: msmt17, root: /x}}, " \
            f"{{name: market1501, root: {tmp_path}/m/}}]"  # fmt: skip
    with pytest.raises(C.ConfigError, match=rf"data.train\[2\]: {tmp_path}/m/ is also data.train\[0\]; expected each "
                                            "training set once"):  # fmt: skip
        C.load(None, [twice], cls=C.RecogConfig)
