import html.parser
import os
import signal
import subprocess

import pytest
import torch

from anychip.models import DeepSeekV3, ModelArgs, preset, save_hf

# Tests use tiny tensors: one thread is fastest and immune to a busy second core.
torch.set_num_threads(1)

# The short CPU training run the command-line tests start (each adds its steps, batch and checkpoints)
DEBUG_RUN = [
    "model.preset=debug",
    "train.seq_len=48",
    "train.warmup_steps=2",
    "train.lr=3e-3",
    "train.mode=pretrain",
    "eval.n=0",
    "log.tensorboard=false",
    "device.type=cpu",
]
CLI_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # worker processes: one thread each

# Small shapes that still exercise every branch of the architecture (not formatted, marker at the end:
# 18 small numbers read best as one block).
BASE = dict(
    vocab_size=96, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, q_lora_rank=16, kv_lora_rank=12,
    qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6, intermediate_size=48, first_k_dense_replace=1,
    moe_intermediate_size=12, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=2,
    topk_group=1, max_position_embeddings=128,
)  # fmt: skip


def make_args(**overrides) -> ModelArgs:
    return ModelArgs(**{**BASE, **overrides})


def make_model(args: ModelArgs, seed: int = 0, bias_std: float = 0.05) -> DeepSeekV3:
    """A randomly initialised model whose balancing biases are non-zero too."""
    torch.manual_seed(seed)
    model = DeepSeekV3(args)
    model.init_weights(seed=seed)
    with torch.no_grad():
        for m in model.moe_layers():
            m.gate.e_score_correction_bias.normal_(0, bias_std)
    return model


def to_transformers(model: DeepSeekV3, path):
    """The same weights in transformers' DeepseekV3ForCausalLM (through save_hf)."""
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    save_hf(model, path)
    peer = transformers.DeepseekV3ForCausalLM.from_pretrained(path, attn_implementation="sdpa", dtype=torch.float32)
    return peer.eval()


def transformers_deepseek(path, **config):
    """A small DeepseekV3ForCausalLM made and saved (``save_pretrained``) by transformers itself,
    with non-trivial routing; ``config`` adds DeepseekV3Config fields (e.g. the MTP layers)."""
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    cfg = transformers.DeepseekV3Config(
        vocab_size=80,
        hidden_size=32,
        intermediate_size=40,
        moe_intermediate_size=12,
        num_hidden_layers=3,
        num_attention_heads=4,
        q_lora_rank=None,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=8,
        n_routed_experts=8,
        n_group=4,
        topk_group=2,
        num_experts_per_tok=3,
        first_k_dense_replace=1,
        max_position_embeddings=64,
        **config,
    )
    torch.manual_seed(0)
    peer = transformers.DeepseekV3ForCausalLM(cfg).eval()
    with torch.no_grad():  # untrained routers and biases are all zero: make routing non-trivial
        for layer in peer.model.layers[1:]:
            layer.mlp.gate.weight.normal_(0, 0.5)
            layer.mlp.gate.e_score_correction_bias.normal_(0, 0.1)
    peer.save_pretrained(path)
    return peer


@pytest.fixture
def debug_args() -> ModelArgs:
    return preset("debug")


def run_command(args: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    """Run a command in its own process group; on timeout kill the whole group (a launcher's
    workers too, not only the launcher) and fail with the end of its stderr."""
    p = subprocess.Popen(
        args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        raise AssertionError(f"timed out after {timeout} s:\n{err[-3000:]}") from None
    return subprocess.CompletedProcess(args, p.returncode, out, err)


class HtmlPage(html.parser.HTMLParser):
    """An HTML page, parsed: tags must balance (an unbalanced close tag fails); collects the text, the
    number of SVG figures, every URL the page would fetch and the class of each table cell."""

    VOID = {
        "meta",
        "br",
        "img",
        "link",
        "input",
        "hr",
        "path",
        "rect",
        "use",
        "stop",
        "circle",
        "line",
        "polyline",
        "polygon",
        "ellipse",
    }

    def __init__(self, text: str):
        super().__init__()
        self.open, self.text, self.svgs, self.fetches, self.cells = [], [], 0, [], []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.svgs += tag == "svg"
        if tag == "td":
            self.cells.append(attrs.get("class"))
        for key in ("src", "href", "xlink:href"):
            if attrs.get(key) and not attrs[key].startswith(("#", "data:")):
                self.fetches.append(attrs[key])
        if tag not in self.VOID:
            self.open.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        if tag not in self.VOID:
            self.open.pop()

    def handle_endtag(self, tag):
        if tag in self.VOID:
            return
        assert self.open and self.open.pop() == tag, f"unbalanced </{tag}>"

    def handle_data(self, data):
        self.text.append(data)

    @property
    def words(self) -> str:
        return " ".join(self.text)
