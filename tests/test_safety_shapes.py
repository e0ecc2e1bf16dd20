"""Shapes, dtypes and file names read from a run or a model directory made elsewhere: a lying
config.json or meta.json gets an error naming the file and the key (or the tensor) before
anything is allocated, never a traceback or gigabytes of memory; integer tensors are never
cast into weights; a task option never reads a local file."""

import json
import pickle
import re
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CLI_ENV, DEBUG_RUN, make_args, make_model
from safetensors.torch import load_file, save_file

from anychip.checkpoint import committed, write_manifest
from anychip.config import load_config
from anychip.data import ReasoningTasks
from anychip.dcp_reader import read_metadata
from anychip.errors import CheckpointError, ConfigError
from anychip.export import checkpoint_model
from anychip.models import DeepSeekV3, ModelArgs, load_hf, save_hf
from anychip.models.hf import args_from_hf_config, hf_config_from_args
from anychip.train.loop import train

RUN = [*DEBUG_RUN, "train.steps=1", "train.global_batch=2", "train.seq_len=16", "checkpoint.interval=1"]
LIMIT = 2 * 2**30  # address space of each process below: ~0.9 GB is what eval and export use on the debug run
BIG = {"hidden_size": 4096, "vocab_size": 200_000}  # within every bound; 3.3 GB of embeddings


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished one-step run: checkpoints of steps 0 and 1 and a final/ Hugging Face export."""
    run = tmp_path_factory.mktemp("trained") / "run"
    train(load_config(None, RUN), run)
    return run


def lie(run: Path, to: Path, shape: dict, metadata: bool = False) -> Path:
    """A copy of ``run`` whose final/config.json and every checkpoint's meta.json give
    ``shape`` (manifests recomputed, as whoever ships a run would); with ``metadata`` the
    DCP metadata claims the new shapes too (its data file unchanged)."""
    shutil.copytree(run, to)
    for d in committed(to / "checkpoints"):
        meta = json.loads((d / "meta.json").read_text())
        meta["model_shape"].update(shape)
        (d / "meta.json").write_text(json.dumps(meta))
        if metadata:  # every tensor's entry agrees with the lie: only the data file tells the truth
            md = read_metadata(d)
            with torch.device("meta"):
                state = DeepSeekV3(ModelArgs(**meta["model_shape"])).state_dict()
            for name, t in state.items():
                info = md.state_dict_metadata[f"model.{name}"]
                info.size, info.chunks[0].sizes = t.shape, t.shape
            (d / ".metadata").write_bytes(pickle.dumps(md))
        (d / "manifest.json").unlink()
        write_manifest(d)
    cfg = json.loads((to / "final" / "config.json").read_text())
    (to / "final" / "config.json").write_text(json.dumps({**cfg, **shape}))
    return to


def limited():
    resource.setrlimit(resource.RLIMIT_AS, (LIMIT, LIMIT))


# every command in one process under the limit: its exit status and the end of what it printed
COMMANDS = """
import contextlib, io, json, sys, traceback
from anychip.cli import main
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except BaseException:
            rc, text = "traceback", traceback.format_exc().strip().splitlines()[-1]
        else:
            text = err.getvalue().strip()
    print(json.dumps([rc, text]), flush=True)
"""


def test_lying_shapes_are_named_before_any_allocation_by_export_and_eval(trained, tmp_path):
    runs = {
        "float": lie(trained, tmp_path / "float", {"vocab_size": 1e13}),
        "fraction": lie(trained, tmp_path / "fraction", {"hidden_size": 32.5}),
        "layers": lie(trained, tmp_path / "layers", {"num_hidden_layers": 1_000_000}),
        "big": lie(trained, tmp_path / "big", BIG, metadata=True),
    }
    argv = [["eval", str(runs[k]), "--n", "1", "--max-new-tokens", "1"] for k in ("float", "fraction", "big")]
    argv += [["export", str(runs[k]), "--out", str(tmp_path / f"hf-{k}")] for k in ("fraction", "layers", "big")]
    p = subprocess.run(
        [sys.executable, "-c", COMMANDS, json.dumps(argv)],
        capture_output=True,
        text=True,
        env=CLI_ENV,
        timeout=120,
        preexec_fn=limited,
    )
    results = [json.loads(line) for line in p.stdout.splitlines()]
    assert len(results) == len(argv), p.stderr[-3000:]
    final, meta = "final/config.json", r"step_00000001/meta.json: model_shape"
    expected = [
        f"{final}: vocab_size = 10000000000000\\.0 is invalid: expected an integer in \\[0, 4194304\\]",
        f"{final}: hidden_size = 32.5 is invalid: expected an integer",
        f"{final[:-12]}/model.safetensors: tensor 'lm_head.weight' has shape \\(259, 32\\); expected \\(200000, 4096\\)",
        f"{meta}: hidden_size = 32.5 is invalid",
        f"{meta}: num_hidden_layers = 1000000 is invalid: expected an integer in \\[0, 1024\\]",
        "model.embed_tokens.weight of shape \\(200000, 4096\\) needs 3276800000 bytes; its data files hold",
    ]
    for (rc, text), pattern, args in zip(results, expected, argv, strict=True):
        assert rc == 2, (args, text)
        assert re.search(pattern, text), (args, text)
    assert not any((tmp_path / f"hf-{k}").exists() for k in runs)


def test_init_from_a_lying_model_stops_with_a_named_error_and_no_restart(trained, tmp_path):
    source = lie(trained, tmp_path / "big", BIG)
    argv = [sys.executable, "-m", "anychip.cli", "grpo", "--init", str(source), "--run-dir", str(tmp_path / "new")]
    argv += [f"--set={s}" for s in ["device.type=cpu", "log.tensorboard=false", "parallel.max_restarts=1"]]
    p = subprocess.Popen(argv, env=CLI_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True, preexec_fn=limited)  # fmt: skip
    _, err = p.communicate(timeout=120)
    assert p.returncode != 0
    assert "tensor 'lm_head.weight' has shape (259, 32); expected (200000, 4096)" in err, err[-3000:]
    assert "restarts" not in err, err[-3000:]
    fatal = json.loads((tmp_path / "new" / "fatal.json").read_text())
    assert fatal["error"].startswith("CheckpointError: ") and "final/model.safetensors" in fatal["error"]
    for i, (shape, pattern) in enumerate(
        [
            ({"vocab_size": 1e13}, r"final/config\.json: vocab_size = 10000000000000\.0 is invalid"),
            ({"n_routed_experts": "8"}, r"final/config\.json: n_routed_experts = '8' is invalid: expected an integer"),
        ]
    ):
        bad = lie(trained, tmp_path / f"bad{i}", shape)
        with pytest.raises(ConfigError, match=pattern):
            load_config(None, [*RUN, f"model.init_from={bad}"])
    checkpoint = lie(trained, tmp_path / "ckpt", BIG, metadata=True)
    with pytest.raises(CheckpointError, match=r"model\.embed_tokens\.weight of shape \(200000, 4096\) needs"):
        checkpoint_model(committed(checkpoint / "checkpoints")[0])


def test_integer_tensor_where_a_weight_belongs_is_an_error_naming_it_and_real_integer_values_are_not_cast(tmp_path):
    path = save_hf(make_model(make_args()), tmp_path / "hf")
    tensors = load_file(path / "model.safetensors")
    key = "model.layers.0.mlp.down_proj.weight"
    tensors[key] = torch.ones_like(tensors[key], dtype=torch.int64)
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(CheckpointError, match=f"model.safetensors: tensor {key!r} holds I64 values;.*refusing to cast"):
        load_hf(path)
    tensors[key] = tensors[key].to(torch.bfloat16)  # another float dtype is a float: converted as before
    save_file(tensors, path / "model.safetensors")
    assert torch.equal(load_hf(path).layers[0].mlp.down_proj.weight, torch.ones(32, 48))


def test_config_json_fields_of_the_wrong_type_are_named():
    good = hf_config_from_args(make_args())
    for change, pattern in [
        ({"num_attention_heads": True}, r"num_attention_heads = True is invalid: expected an integer"),
        ({"rms_norm_eps": "1e-6"}, r"rms_norm_eps = '1e-6' is invalid: expected a finite number"),
        ({"rope_theta": [1]}, r"'rope_theta' = \[1\]: expected a finite number"),
        ({"rope_scaling": {"type": "yarn", "original_max_position_embeddings": 64.5}}, "original_max_position"),
        ({"q_lora_rank": 2**17}, r"q_lora_rank = 131072 is invalid: expected an integer in \[0, 65536\] or null"),
    ]:
        with pytest.raises(ConfigError, match=f"^x/config.json: .*{pattern}"):
            args_from_hf_config({**good, **change}, source="x/config.json")
    with pytest.raises(ConfigError, match=r"model\.vocab_size = 10000000000000: expected an integer in \[0, 4194304\]"):
        load_config(None, ["model.vocab_size=10000000000000"])


def test_a_task_option_naming_a_local_file_is_refused(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("hunter2\n")
    for value in [str(secret), f"../../../../../../..{secret}", "../words3to10.txt"]:
        with pytest.raises(ConfigError, match=r"data\.task_options\.spell_backward\.data_file = .*never names a local"):
            ReasoningTasks(["spell_backward"], heldout_size=2, task_kwargs={"spell_backward": {"data_file": value}})
    with pytest.raises(ConfigError, match=r"task_options\.chain_sum\.words = \['a', '~/x'\]: looks like a path"):
        ReasoningTasks(["chain_sum"], heldout_size=2, task_kwargs={"chain_sum": {"words": ["a", "~/x"]}})
    own = ReasoningTasks(
        ["spell_backward"], heldout_size=2, task_kwargs={"spell_backward": {"data_file": "words3to10.txt"}}
    )
    assert "hunter2" not in own.example(0).prompt
    ops = ReasoningTasks(["basic_arithmetic"], heldout_size=2, task_kwargs={"basic_arithmetic": {"operators": ["/"]}})
    assert "/" in ops.example(0).prompt  # one "/" is division, not a path
