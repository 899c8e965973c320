"""`--export`: the mapping in SGLang's token-map file, vLLM speculators' files and kept_ids.json,
loaded here as each consumer loads it.

The consumers' loaders are re-implemented plainly from their source (docs/SPECFORGE.md section 8):
SGLang's ``load_token_map`` (``torch.load(weights_only=True)``, then ``torch.tensor(obj, int64)``,
and the EAGLE worker's row slicing and ``hot_token_id[topk_index]``), speculators' ``_load_mappings``
(``np.load`` of d2t.npy/t2d.npy), its ``load_vocab_mappings`` checks and its
``build_vocab_mappings_from_distribution`` rule on token_freq.pt. Every file is compared with the
d2t/t2d of vocab_mapping.pt (what SpecForge trains with), read independently.
"""

from __future__ import annotations

import hashlib
import io
import json
import struct

import numpy as np
import pytest
import torch
from conftest import DATA, LLAMA3_CONFIG

from specforge_vocab.cli.main import main
from specforge_vocab.counting.counts_file import load_counts
from specforge_vocab.errors import InputError
from specforge_vocab.writing.exports import export_payloads, frequency_ranked
from specforge_vocab.writing.mapping import build_mapping

FIXTURES = [str(DATA / "gsm8k_train_sample.jsonl"), str(DATA / "humaneval_sample.jsonl")]
ALL_FORMATS = ["sglang-token-map", "speculators", "ids"]


# ---------------------------------------------------------------- the consumers, re-implemented


def sglang_load_token_map(path):
    """SGLang spec_utils.load_token_map for a local file."""
    hot_token_id = torch.load(path, weights_only=True)
    return torch.tensor(hot_token_id, dtype=torch.int64)


def speculators_load_mappings(d2t_path, t2d_path):
    """speculators scripts/train.py _load_mappings: np.load both, k from d2t."""
    d2t = torch.from_numpy(np.load(d2t_path))
    t2d = torch.from_numpy(np.load(t2d_path))
    return d2t, t2d, d2t.shape[0]


def speculators_check(t2d, d2t, vocab_size, k):
    """speculators model.py load_vocab_mappings' checks."""
    assert t2d.shape[0] == vocab_size and int(t2d.sum()) == k and d2t.shape[0] == k


def speculators_build(token_freq, k, vocab_size):
    """speculators train/vocab_mapping.py build_vocab_mappings_from_distribution."""
    ranked = sorted(token_freq, key=lambda t: (-token_freq[t], t))
    chosen = ranked[: min(k, len(ranked))]
    if len(chosen) < k:
        have = set(chosen)
        for t in range(k):
            if t not in have:
                chosen.append(t)
            if len(chosen) >= k:
                break
    chosen.sort()
    d2t = torch.tensor(chosen, dtype=torch.long) - torch.arange(k, dtype=torch.long)
    t2d = torch.zeros(vocab_size, dtype=torch.bool)
    t2d[chosen] = True
    return d2t, t2d


# ---------------------------------------------------------------- one real optimize run


@pytest.fixture(scope="module")
def exported(tmp_path_factory, llama3_dir):
    tmp = tmp_path_factory.mktemp("exports")
    config = tmp / "draft.json"
    config.write_text(LLAMA3_CONFIG.read_text())
    out = tmp / "out"
    argv = ["-q", "optimize", "--dataset-path", *FIXTURES, "--tokenizer-path", llama3_dir, "--chat-template"]
    argv += ["llama3", "--config-path", str(config), "--output-dir", str(out), "--draft-vocab-size", "700"]
    argv += ["--no-cache", "--export", *ALL_FORMATS]
    assert main(argv) == 0
    mapping = torch.load(out / "vocab_mapping.pt", weights_only=True)
    counts, _ = load_counts(str(out / "token_counts.safetensors"))
    kept = (torch.arange(mapping["d2t"].shape[0]) + mapping["d2t"]).numpy()
    return out, mapping, counts, kept


# torch.tensor(tensor) warns "To copy construct from a tensor ..." in SGLang too; the ids are unaffected.
@pytest.mark.filterwarnings("ignore:To copy construct from a tensor")
def test_sglang_loads_the_token_map_as_the_kept_ids_most_frequent_first(exported):
    out, mapping, counts, kept = exported
    hot = sglang_load_token_map(out / "token_map.pt")
    assert hot.dtype == torch.int64 and hot.ndim == 1 and hot.numel() == 700
    assert sorted(hot.tolist()) == kept.tolist()  # exactly the mapping's kept set
    ranked = [(-int(counts[t]), t) for t in hot.tolist()]
    assert ranked == sorted(ranked)  # most frequent first, ties to the smaller id
    # The EAGLE worker slices the target head to those rows, and maps draft row i to hot[i].
    head = torch.arange(counts.shape[0] * 2, dtype=torch.float32).reshape(-1, 2)
    sliced = head.data[hot]
    topk_index = torch.tensor([0, 5, 699])
    assert torch.equal(sliced[topk_index], head[hot[topk_index]])
    assert set(hot[topk_index].tolist()) <= set(kept.tolist())


def test_speculators_loads_d2t_t2d_and_rebuilds_them_from_token_freq(exported):
    out, mapping, counts, kept = exported
    V = counts.shape[0]
    d2t, t2d, k = speculators_load_mappings(out / "d2t.npy", out / "t2d.npy")
    assert d2t.dtype == torch.int64 and t2d.dtype == torch.bool and k == 700
    speculators_check(t2d, d2t, V, k)
    assert torch.equal(d2t, mapping["d2t"]) and torch.equal(t2d, mapping["t2d"])
    # Its heads are initialised from the verifier rows t2d selects, in ascending order: those rows
    # must be arange(k) + d2t.
    assert torch.nonzero(t2d).flatten().tolist() == (torch.arange(k) + d2t).tolist() == kept.tolist()
    token_freq = torch.load(out / "token_freq.pt", weights_only=True)
    assert type(token_freq) is dict and all(type(t) is int and type(c) is int for t, c in token_freq.items())
    seen = np.flatnonzero(counts)
    assert token_freq == {int(t): int(counts[t]) for t in seen}
    rebuilt_d2t, rebuilt_t2d = speculators_build(token_freq, k, V)
    assert torch.equal(rebuilt_d2t, d2t) and torch.equal(rebuilt_t2d, t2d)


def test_kept_ids_json_holds_the_kept_ids_v_and_the_mapping_fingerprint(exported):
    out, mapping, counts, kept = exported
    data = json.loads((out / "kept_ids.json").read_text())
    assert data["kept_ids"] == kept.tolist() and data["vocab_size"] == counts.shape[0]
    assert data["draft_vocab_size"] == 700
    encoded = struct.pack("<q", counts.shape[0]) + b"".join(struct.pack("<q", t) for t in data["kept_ids"])
    assert data["mapping_fingerprint"] == hashlib.sha256(encoded).hexdigest()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["exports"]["mapping_fingerprint"] == data["mapping_fingerprint"]
    assert set(summary["exports"]["files"]) == {"token_map.pt", "token_freq.pt", "d2t.npy", "t2d.npy", "kept_ids.json"}


def test_a_rerun_without_export_removes_the_earlier_exports(exported, tmp_path):
    out, _, counts, _ = exported
    config = tmp_path / "draft.json"
    config.write_text(LLAMA3_CONFIG.read_text())
    argv = ["-q", "optimize", "--counts", str(out / "token_counts.safetensors"), "--config-path", str(config)]
    moved = tmp_path / "out"
    moved.mkdir()
    for name in ("token_map.pt", "kept_ids.json", "summary.json"):
        (moved / name).write_bytes((out / name).read_bytes())
    (moved / "notes.txt").write_text("mine")
    assert main(argv + ["--output-dir", str(moved), "--draft-vocab-size", "500"]) == 0
    assert not (moved / "token_map.pt").exists() and not (moved / "kept_ids.json").exists()
    assert (moved / "notes.txt").read_text() == "mine"  # only the tool's own names are replaced


# ---------------------------------------------------------------- the pure functions


def test_pinned_ids_outside_the_top_k_keep_d2t_npy_and_say_token_freq_alone_differs():
    counts = np.array([50, 0, 40, 30, 1, 20], dtype=np.int64)
    kept = np.array([0, 2, 4])  # id 4 pinned: the top 3 by count are 0, 2, 3
    files, notes = export_payloads(["speculators"], counts=counts, kept=kept, vocab_size=6)
    d2t, t2d = build_mapping(kept, 6)
    assert np.array_equal(np.load(io.BytesIO(files["d2t.npy"])), d2t.numpy())
    assert notes and "pinned id(s) 4" in notes[0]
    rebuilt, _ = speculators_build(torch.load(io.BytesIO(files["token_freq.pt"])), 3, 6)
    assert (torch.arange(3) + rebuilt).tolist() == [0, 2, 3]  # what the note warns about


def test_frequency_ranked_breaks_ties_by_the_smaller_id():
    counts = np.array([3, 7, 3, 7, 0])
    assert frequency_ranked(counts, np.array([4, 3, 2, 1, 0])).tolist() == [1, 3, 0, 2, 4]


def test_unknown_or_repeated_formats_are_refused():
    with pytest.raises(InputError, match=r"--export must name formats among .* but got 'onnx'"):
        export_payloads(["onnx"], counts=np.ones(3, dtype=np.int64), kept=np.array([0]), vocab_size=3)
    with pytest.raises(InputError, match=r"--export must list each format once, but got ids more than once"):
        export_payloads(["ids", "ids"], counts=np.ones(3, dtype=np.int64), kept=np.array([0]), vocab_size=3)
