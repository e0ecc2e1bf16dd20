"""Config: TOML + --set overrides into typed sections; bad input is named before any work."""

import pytest

from anychip.config import Config, load_config
from anychip.errors import ConfigError


def test_embedded_default_resolves_and_round_trips(tmp_path):
    cfg = load_config()
    assert cfg.model.preset == "tiny" and cfg.train.steps > 0 and cfg.device.type == "auto"
    assert cfg.checkpoint.interval == 100 and cfg.parallel.max_restarts == 3
    f = tmp_path / "run.toml"
    f.write_text(cfg.to_toml())
    assert load_config(f).to_dict() == cfg.to_dict()


def test_file_then_overrides(tmp_path):
    f = tmp_path / "my.toml"
    f.write_text('[train]\nsteps = 50\nseed = 3\n[model]\npreset = "debug"\nnum_hidden_layers = 2\n')
    cfg = load_config(f, ["train.steps=7", "data.tasks=chain_sum,basic_arithmetic", "device.type=cpu"])
    assert cfg.train.steps == 7 and cfg.train.seed == 3
    assert cfg.data.tasks == ["chain_sum", "basic_arithmetic"]
    args = cfg.model_args()
    assert args.num_hidden_layers == 2 and args.hidden_size == 32  # debug preset + override
    assert cfg.model_args(vocab_size=300).vocab_size == 300  # grows to fit a tokenizer


@pytest.mark.parametrize(
    "override, words",
    [
        ("train.stepz=3", ["unknown key train.stepz", "steps"]),
        ("train.steps=many", ["train.steps", "'many'", "integer"]),
        ("train.steps=0", ["train.steps = 0", "> 0"]),
        ("train.lr=2", ["train.lr", "(0, 1)"]),
        ("train.mode=rl", ["train.mode", "pretrain, sft"]),
        ("model.hidden=64", ["model.hidden", "unknown key"]),
        ("model.preset=huge", ["model.preset", "tiny"]),
        ("model.topk_group=5", ["topk_group"]),
        ("foo.bar=1", ["unknown section [foo]"]),
        ("train.steps", ["section.key=value"]),
        ("log.tensorboard=yes", ["log.tensorboard", "true or false"]),
        ("train.micro_batch=5", ["micro_batch", "divisor"]),
        ("train.seq_len=5000", ["seq_len", "max_position_embeddings"]),
    ],
)
def test_bad_values_are_named(override, words):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    for w in words:
        assert w in str(err.value), (w, str(err.value))


def test_bad_file_is_named(tmp_path):
    f = tmp_path / "broken.toml"
    f.write_text("[train\nsteps = 1")
    with pytest.raises(ConfigError, match="broken.toml"):
        load_config(f)
    f.write_text("[train]\nsteps = 1.5\n")
    with pytest.raises(ConfigError, match=r"broken.toml: train.steps = 1.5: expected an integer"):
        load_config(f)
    with pytest.raises(FileNotFoundError, match="nope.toml"):
        load_config(tmp_path / "nope.toml")


def test_every_key_is_in_the_embedded_default():
    """The embedded default documents every key (it is the reference)."""
    from anychip.config import default_config_text

    text = default_config_text()
    for section, values in Config().to_dict().items():
        assert f"[{section}]" in text
        for key in values:
            assert f"\n{key} =" in text, f"{section}.{key} missing from default.toml"


def test_none_survives_the_toml_round_trip(tmp_path):
    cfg = load_config(None, ["model.q_lora_rank=none"])
    assert cfg.model_args().q_lora_rank is None
    f = tmp_path / "c.toml"
    f.write_text(cfg.to_toml())
    assert load_config(f).model_args().q_lora_rank is None


def test_batch_must_split_over_processes():
    with pytest.raises(ConfigError, match="global_batch.*multiple of parallel.nproc = 3"):
        load_config(None, ["parallel.nproc=3", "train.global_batch=16"])
    with pytest.raises(ConfigError, match="micro_batch.*divisor of the 8 sequences per process"):
        load_config(None, ["parallel.nproc=2", "train.micro_batch=3", "train.global_batch=16"])
