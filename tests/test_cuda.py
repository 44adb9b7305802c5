"""The CUDA path, on a machine with a GPU (skipped elsewhere, with the reason): parity with transformers on the GPU
in fp32 and under bf16 autocast, and a few steps of general distillation (plain and DeepSpeed bf16) whose every term
falls, with the teacher and student on the GPU. benchmarks/gpu.sh runs this module first."""

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible to torch")


@pytest.fixture(scope="module")
def pair(minilm_dir):
    from transformers import AutoTokenizer
    from transformers import BertModel as HFBert

    from tinybert.checkpoint import load_model

    tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir))
    enc = tokenizer(["The quick brown fox jumps over the lazy dog.", "It rained."],
                    ["A second segment follows the first one here.", "So we stayed inside and read."],
                    padding=True, return_tensors="pt").to("cuda")
    ours = load_model(minilm_dir).cuda().eval()
    hf = HFBert.from_pretrained(str(minilm_dir), attn_implementation="eager").cuda().eval()
    return enc, ours, hf


@pytest.mark.parametrize("precision, tolerance", [("fp32", 1e-4), ("bf16", 0.1)])
def test_hidden_states_match_transformers_on_cuda(pair, precision, tolerance):
    enc, ours, hf = pair
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
        out = ours(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
        ref = hf(**enc, output_hidden_states=True)
    keep = enc["attention_mask"].bool()
    for i, (a, b) in enumerate(zip(out.hidden_states, ref.hidden_states)):
        assert (a.float() - b.float())[keep].abs().max() <= tolerance, f"hidden state {i} ({precision})"


@pytest.mark.parametrize("deepspeed", [False, True])
def test_general_distillation_steps_on_cuda(deepspeed, minilm_dir, data_dir, tmp_path):
    import json

    from tinybert.general import run_general
    from tinybert.recipe import load_recipe

    if deepspeed:
        pytest.importorskip("deepspeed")
    over = ["batch_size=16", "max_seq_length=64", "max_steps=30", "log_every=1", "eval_every=0", "save_every=30",
            "heldout_fraction=0", "precision=bf16", "layer_map=[0,2,3,5,6]", "learning_rate=5e-4",
            *(["deepspeed=zero2-bf16.json"] if deepspeed else [])]
    out = run_general(load_recipe("general", over), teacher=str(minilm_dir), student="tinybert-4l-312d",
                      corpus=[str(data_dir / "corpus" / "tinyshakespeare")], output=tmp_path / "run", progress=False)
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    train = [r for r in records if r.get("kind") == "train"]
    assert len(train) == 30 and (out / "model.safetensors").is_file()
    for term in ("embedding", "hidden", "attention"):
        first, last = sum(r[term] for r in train[:5]) / 5, sum(r[term] for r in train[-5:]) / 5
        assert last < first, (term, first, last)
