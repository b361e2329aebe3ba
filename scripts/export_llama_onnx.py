#!/usr/bin/env python3
"""Export a llama-family decoder to an ONNX bundle that tq-onnx runs with explicit KV caches.

Sources (exactly one):
  --gguf FILE      a llama-architecture GGUF (F32/F16/Q8_0/Q4_x tensors are dequantized to f32)
  --hf-dir DIR     a Hugging Face llama-family directory: config.json, tokenizer.json,
                   *.safetensors (f32, f16 or bf16), optional tokenizer_config.json
  --tiny           a tiny model with seeded random weights and a byte-level BPE tokenizer trained
                   on a built-in text, for plumbing tests (written through the --hf-dir path)

Output directory: model.onnx, tokenizer.json, config.json, and native/stage0..stage<L>.onnx: the
same model cut around each layer's attention, for tq-onnx's native path, which attends on its
quantized cache itself (no float past); see build_native.

Graph (opset 17, batch 1):
  inputs   input_ids i64 [1, S], attention_mask i64 [1, P + S], position_ids i64 [1, S],
           past_key_values.<i>.key|value f32 [1, kv_heads, P, head_dim]
  outputs  logits f32 [1, S, vocab], present.<i>.key|value f32 [1, kv_heads, P + S, head_dim],
           queries.<i> f32 [1, heads, S, head_dim] (after RoPE, for K/V/query trace dumps)
RMSNorm, rotate-half RoPE from position_ids, grouped-query attention with a causal mask (key t is
visible to new token s when t <= P + s and attention_mask[t] == 1), SwiGLU MLP, tied or separate
output head. Needs numpy, onnx, and gguf (for --gguf) or tokenizers (for --tiny).
"""
import argparse
import json
import os
import struct
import sys
import tempfile
import time

import numpy as np


def log(msg):
    print(f"export: {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Weights: a dict of HF names -> f32 arrays in PyTorch layout ([out, in] for projections).
# ---------------------------------------------------------------------------------------------


def unpermute_rope(w, n_head):
    """Undo llama.cpp's row permutation of Q/K (interleaved RoPE) to get rotate-half order."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def load_gguf(path):
    import gguf

    reader = gguf.GGUFReader(path)

    def field(name, default=None):
        f = reader.fields.get(name)
        if f is None:
            return default
        return f.contents()

    arch = field("general.architecture")
    if arch != "llama":
        raise SystemExit(f"export: {path}: architecture {arch!r} is not llama")
    n_layers = int(field("llama.block_count"))
    hidden = int(field("llama.embedding_length"))
    n_head = int(field("llama.attention.head_count"))
    n_kv = int(field("llama.attention.head_count_kv", n_head))
    head_dim = int(field("llama.attention.key_length", hidden // n_head))
    cfg = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "num_hidden_layers": n_layers,
        "hidden_size": hidden,
        "intermediate_size": int(field("llama.feed_forward_length")),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "rms_norm_eps": float(field("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(field("llama.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(field("llama.context_length", 2048)),
        "bos_token_id": int(field("tokenizer.ggml.bos_token_id", 1)),
        "eos_token_id": int(field("tokenizer.ggml.eos_token_id", 2)),
        "name": str(field("general.name", "gguf model")),
    }
    tensors = {}
    names = {
        "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
        "attn_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm",
    }
    for t in reader.tensors:
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        parts = t.name.split(".")
        if t.name == "token_embd.weight":
            key = "model.embed_tokens.weight"
        elif t.name == "output_norm.weight":
            key = "model.norm.weight"
        elif t.name == "output.weight":
            key = "lm_head.weight"
        elif parts[0] == "blk" and parts[2] in names:
            key = f"model.layers.{parts[1]}.{names[parts[2]]}.weight"
            if parts[2] == "attn_q":
                w = unpermute_rope(w, n_head)
            elif parts[2] == "attn_k":
                w = unpermute_rope(w, n_kv)
        else:
            continue
        tensors[key] = w
    cfg["tie_word_embeddings"] = "lm_head.weight" not in tensors
    cfg["vocab_size"] = int(tensors["model.embed_tokens.weight"].shape[0])
    tokenizer, template = gguf_tokenizer(reader, field)
    if template:
        cfg["chat_template"] = template
    return cfg, tensors, tokenizer


def gguf_tokenizer(reader, field):
    """tokenizer.json (byte-level BPE with single-digit splitting) from the GGUF vocabulary."""
    model = field("tokenizer.ggml.model")
    if model != "gpt2":
        raise SystemExit(f"export: tokenizer model {model!r} is not byte-level BPE (gpt2)")
    tokens = field("tokenizer.ggml.tokens")
    types = field("tokenizer.ggml.token_type")
    merges = field("tokenizer.ggml.merges")
    added = []
    for i, (tok, ty) in enumerate(zip(tokens, types)):
        if ty in (3, 4):  # control, user-defined
            added.append(
                {
                    "id": i,
                    "content": tok,
                    "single_word": False,
                    "lstrip": False,
                    "rstrip": False,
                    "normalized": ty == 4,
                    "special": ty == 3,
                }
            )
    tok = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Digits", "individual_digits": True},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
            ],
        },
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": {t: i for i, t in enumerate(tokens)},
            "merges": list(merges),
        },
    }
    return tok, field("tokenizer.chat_template")


def read_safetensors(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        raw = data[a:b]
        dt = info["dtype"]
        if dt == "F32":
            arr = np.frombuffer(raw, dtype="<f4")
        elif dt == "F16":
            arr = np.frombuffer(raw, dtype="<f2").astype(np.float32)
        elif dt == "BF16":
            arr = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            raise SystemExit(f"export: {path}: tensor {name} has unsupported dtype {dt}")
        out[name] = arr.reshape(info["shape"]).astype(np.float32)
    return out


def load_hf_dir(path):
    with open(os.path.join(path, "config.json")) as f:
        hf = json.load(f)
    if hf.get("model_type") not in ("llama", "mistral", "qwen2") and "Llama" not in str(hf.get("architectures")):
        raise SystemExit(f"export: {path}: model_type {hf.get('model_type')!r} is not llama-family")
    if hf.get("attention_bias") or hf.get("model_type") == "qwen2":
        raise SystemExit("export: attention biases are not supported")
    n_head = hf["num_attention_heads"]
    cfg = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "num_hidden_layers": hf["num_hidden_layers"],
        "hidden_size": hf["hidden_size"],
        "intermediate_size": hf["intermediate_size"],
        "num_attention_heads": n_head,
        "num_key_value_heads": hf.get("num_key_value_heads", n_head),
        "head_dim": hf.get("head_dim", hf["hidden_size"] // n_head),
        "rms_norm_eps": hf.get("rms_norm_eps", 1e-5),
        "rope_theta": hf.get("rope_theta", 10000.0),
        "max_position_embeddings": hf.get("max_position_embeddings", 2048),
        "bos_token_id": hf.get("bos_token_id"),
        "eos_token_id": hf.get("eos_token_id"),
        "tie_word_embeddings": hf.get("tie_word_embeddings", False),
        "vocab_size": hf["vocab_size"],
        "name": hf.get("_name_or_path", os.path.basename(os.path.abspath(path))),
    }
    if hf.get("rope_scaling"):
        raise SystemExit("export: rope_scaling is not supported")
    tensors = {}
    files = sorted(p for p in os.listdir(path) if p.endswith(".safetensors"))
    if not files:
        raise SystemExit(f"export: {path}: no .safetensors files")
    for p in files:
        tensors.update(read_safetensors(os.path.join(path, p)))
    with open(os.path.join(path, "tokenizer.json")) as f:
        tokenizer = json.load(f)
    tc = os.path.join(path, "tokenizer_config.json")
    if os.path.exists(tc):
        with open(tc) as f:
            template = json.load(f).get("chat_template")
        if isinstance(template, str):
            cfg["chat_template"] = template
    if "chat_template" in hf and "chat_template" not in cfg:
        cfg["chat_template"] = hf["chat_template"]
    if cfg["tie_word_embeddings"] is False and "lm_head.weight" not in tensors:
        cfg["tie_word_embeddings"] = True
    return cfg, tensors, tokenizer


# ---------------------------------------------------------------------------------------------
# Tiny model: seeded random weights and a small trained tokenizer, written as an HF directory.
# ---------------------------------------------------------------------------------------------

TINY_TEXT = """The quick brown fox jumps over the lazy dog. A small model with random weights
still has a real tokenizer, real shapes and a real key-value cache, which is all a plumbing test
needs. Paris is the capital of France; Berlin is the capital of Germany; Rome is the capital of
Italy. Numbers such as 12, 345 and 6789 are split into single digits. What is the capital of
France? The capital of France is Paris. Vectors are rotated, quantized to a few bits per
coordinate and packed; inner products are scored from lookup tables without decoding keys."""

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def write_tiny_hf(path, seed):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    os.makedirs(path, exist_ok=True)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([TINY_TEXT] * 4, trainer=trainer)
    tok.save(os.path.join(path, "tokenizer.json"))
    vocab = tok.get_vocab_size()
    rng = np.random.default_rng(seed)
    layers, hidden, heads, kv, head_dim, ffn = 2, 128, 4, 2, 32, 256
    cfg = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "num_hidden_layers": layers,
        "hidden_size": hidden,
        "intermediate_size": ffn,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "head_dim": head_dim,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 1024,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "tie_word_embeddings": False,
        "vocab_size": vocab,
        "_name_or_path": "tq-tiny-llama",
    }
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"chat_template": CHATML, "eos_token": "<|im_end|>"}, f, indent=1)

    def w(shape, scale):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    # A separate output head (a tied one would make every token predict itself) and a final norm
    # of 0.25 give logits with a spread of a few nats, so perplexities are finite.
    t = {
        "model.embed_tokens.weight": w((vocab, hidden), 1.0),
        "lm_head.weight": w((vocab, hidden), 1.0),
        "model.norm.weight": np.full(hidden, 0.25, np.float32),
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        s = 1.0 / np.sqrt(hidden)
        t[p + "self_attn.q_proj.weight"] = w((heads * head_dim, hidden), 2 * s)
        t[p + "self_attn.k_proj.weight"] = w((kv * head_dim, hidden), 2 * s)
        t[p + "self_attn.v_proj.weight"] = w((kv * head_dim, hidden), s)
        t[p + "self_attn.o_proj.weight"] = w((hidden, heads * head_dim), 0.5 / np.sqrt(heads * head_dim))
        t[p + "mlp.gate_proj.weight"] = w((ffn, hidden), s)
        t[p + "mlp.up_proj.weight"] = w((ffn, hidden), s)
        t[p + "mlp.down_proj.weight"] = w((hidden, ffn), 0.5 / np.sqrt(ffn))
        t[p + "input_layernorm.weight"] = (1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32)
        t[p + "post_attention_layernorm.weight"] = (1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32)
    header, blobs, off = {}, [], 0
    for name in sorted(t):
        b = t[name].tobytes()
        header[name] = {"dtype": "F32", "shape": list(t[name].shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    hb = json.dumps(header).encode()
    hb += b" " * ((8 - len(hb) % 8) % 8)
    with open(os.path.join(path, "model.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for b in blobs:
            f.write(b)


# ---------------------------------------------------------------------------------------------
# Graph
# ---------------------------------------------------------------------------------------------


class GraphBuilder:
    """Nodes and initializers of one ONNX graph, with the llama building blocks."""

    def __init__(self, cfg, tensors):
        from onnx import TensorProto, helper, numpy_helper

        self.TensorProto, self.helper, self.numpy_helper = TensorProto, helper, numpy_helper
        self.cfg, self.tensors = cfg, tensors
        self.nodes, self.inits, self.counter = [], [], 0
        self.hd = cfg["head_dim"]
        self.eps = float(cfg["rms_norm_eps"])

    def name(self, prefix):
        self.counter += 1
        return f"{prefix}_{self.counter}"

    def const(self, arr, prefix="c"):
        n = self.name(prefix)
        self.inits.append(self.numpy_helper.from_array(np.asarray(arr), n))
        return n

    def op(self, kind, inputs, prefix=None, **attrs):
        out = self.name(prefix or kind.lower())
        self.nodes.append(self.helper.make_node(kind, inputs, [out], name=out, **attrs))
        return out

    def named(self, kind, inputs, out, **attrs):
        """A node whose output has a fixed name (a graph output)."""
        self.nodes.append(self.helper.make_node(kind, inputs, [out], name=out, **attrs))
        return out

    def weight(self, key):
        if key not in self.tensors:
            raise SystemExit(f"export: missing weight {key}")
        return self.tensors[key]

    def linear(self, x, key):
        # x [.., in] @ W^T where W is [out, in]
        return self.op("MatMul", [x, self.const(np.ascontiguousarray(self.weight(key).T), "w")])

    def rmsnorm(self, x, key):
        sq = self.op("Mul", [x, x])
        mean = self.op("ReduceMean", [sq], axes=[-1], keepdims=1)
        eps = self.const(np.array(self.eps, np.float32))
        inv = self.op("Reciprocal", [self.op("Sqrt", [self.op("Add", [mean, eps])])])
        norm = self.const(self.weight(key).astype(np.float32), "norm")
        return self.op("Mul", [self.op("Mul", [x, inv]), norm])

    def rope_tables(self):
        """cos / sin [1, 1, S, hd] from the position_ids input."""
        hd, theta = self.hd, float(self.cfg["rope_theta"])
        inv_freq = (1.0 / theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd)).astype(np.float32)
        pos = self.op("Cast", ["position_ids"], to=self.TensorProto.FLOAT)  # [1,S]
        pos3 = self.op("Unsqueeze", [pos, self.const(np.array([2], np.int64))])  # [1,S,1]
        freqs = self.op("Mul", [pos3, self.const(inv_freq, "inv_freq")])  # [1,S,hd/2]
        emb = self.op("Concat", [freqs, freqs], axis=-1)  # [1,S,hd]
        emb4 = self.op("Unsqueeze", [emb, self.const(np.array([1], np.int64))])  # [1,1,S,hd]
        self.cos = self.op("Cos", [emb4])
        self.sin = self.op("Sin", [emb4])
        self.ax3 = self.const(np.array([3], np.int64))

    def rope(self, x):
        hd, half = self.hd, self.hd // 2
        c = lambda v: self.const(np.array([v], np.int64))  # noqa: E731
        x1 = self.op("Slice", [x, c(0), c(half), self.ax3])
        x2 = self.op("Slice", [x, c(half), c(hd), self.ax3])
        rot = self.op("Concat", [self.op("Neg", [x2]), x1], axis=-1)
        return self.op("Add", [self.op("Mul", [x, self.cos]), self.op("Mul", [rot, self.sin])])

    def heads(self, x, n):
        # [1,S,n*hd] -> [1,n,S,hd]
        r = self.op("Reshape", [x, self.const(np.array([1, -1, n, self.hd], np.int64))])
        return self.op("Transpose", [r], perm=[0, 2, 1, 3])

    def embed(self):
        emb_w = self.weight("model.embed_tokens.weight")
        return self.op("Gather", [self.const(emb_w, "embed"), "input_ids"], axis=0)  # [1,S,H]

    def qkv(self, h, i):
        """Layer i before attention: q [1,nh,S,hd] and k [1,nkv,S,hd] after RoPE, v."""
        p = f"model.layers.{i}."
        x = self.rmsnorm(h, p + "input_layernorm.weight")
        q = self.rope(self.heads(self.linear(x, p + "self_attn.q_proj.weight"), self.cfg["num_attention_heads"]))
        nkv = self.cfg["num_key_value_heads"]
        k = self.rope(self.heads(self.linear(x, p + "self_attn.k_proj.weight"), nkv))
        v = self.heads(self.linear(x, p + "self_attn.v_proj.weight"), nkv)
        return q, k, v

    def after_attention(self, h, ctx, i):
        """Layer i after attention: ctx [1,S,nh*hd] through o_proj into the residual, then the MLP."""
        p = f"model.layers.{i}."
        h = self.op("Add", [h, self.linear(ctx, p + "self_attn.o_proj.weight")])
        x = self.rmsnorm(h, p + "post_attention_layernorm.weight")
        gate = self.linear(x, p + "mlp.gate_proj.weight")
        act = self.op("Mul", [gate, self.op("Sigmoid", [gate])])
        up = self.linear(x, p + "mlp.up_proj.weight")
        return self.op("Add", [h, self.linear(self.op("Mul", [act, up]), p + "mlp.down_proj.weight")])

    def logits(self, h):
        x = self.rmsnorm(h, "model.norm.weight")
        if self.cfg["tie_word_embeddings"]:
            head = np.ascontiguousarray(self.weight("model.embed_tokens.weight").T)
        else:
            head = np.ascontiguousarray(self.weight("lm_head.weight").T)
        return self.named("MatMul", [x, self.const(head, "lm_head")], "logits")

    def save(self, inputs, outputs, path, name):
        import onnx

        graph = self.helper.make_graph(self.nodes, name, inputs, outputs, self.inits)
        model = self.helper.make_model(graph, opset_imports=[self.helper.make_opsetid("", 17)], producer_name="tq export")
        model.ir_version = 8
        onnx.save_model(model, path)


def build_onnx(cfg, tensors, out_path):
    from onnx import TensorProto, helper

    L = cfg["num_hidden_layers"]
    nh = cfg["num_attention_heads"]
    nkv = cfg["num_key_value_heads"]
    hd = cfg["head_dim"]
    g = nh // nkv
    V = cfg["vocab_size"]
    if nh % nkv:
        raise SystemExit("export: query heads must be a multiple of kv heads")
    b = GraphBuilder(cfg, tensors)
    op, const = b.op, b.const

    # scalar shape facts (0-d tensors)
    ids_shape = op("Shape", ["input_ids"])
    S = op("Gather", [ids_shape, const(np.array(1, np.int64))], axis=0)
    past_shape = op("Shape", ["past_key_values.0.key"])
    P = op("Gather", [past_shape, const(np.array(2, np.int64))], axis=0)
    T = op("Add", [P, S])
    zero = const(np.array(0, np.int64))
    one = const(np.array(1, np.int64))
    t_idx = op("Range", [zero, T, one])  # [T]
    s_idx = op("Add", [op("Range", [zero, S, one]), P])  # [S]
    s_col = op("Unsqueeze", [s_idx, const(np.array([1], np.int64))])  # [S,1]
    t_row = op("Unsqueeze", [t_idx, const(np.array([0], np.int64))])  # [1,T]
    causal = op("LessOrEqual", [t_row, s_col])  # [S,T]
    am = op("Equal", ["attention_mask", const(np.array(1, np.int64))])  # [1,T]
    visible = op("And", [causal, am])  # [S,T]
    mask = op("Where", [visible, const(np.array(0.0, np.float32)), const(np.array(-1e9, np.float32))])
    b.rope_tables()

    h = b.embed()
    scale = const(np.array(1.0 / np.sqrt(hd), np.float32))
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "sequence"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [1, "total_sequence"]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, [1, "sequence"]),
    ]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "sequence", V])]
    for i in range(L):
        q, k, v = b.qkv(h, i)
        qo = b.named("Identity", [q], f"queries.{i}")
        outputs.append(helper.make_tensor_value_info(qo, TensorProto.FLOAT, [1, nh, "sequence", hd]))
        pk, pv = f"past_key_values.{i}.key", f"past_key_values.{i}.value"
        inputs.append(helper.make_tensor_value_info(pk, TensorProto.FLOAT, [1, nkv, "past_sequence", hd]))
        inputs.append(helper.make_tensor_value_info(pv, TensorProto.FLOAT, [1, nkv, "past_sequence", hd]))
        ok = b.named("Concat", [pk, k], f"present.{i}.key", axis=2)
        ov = b.named("Concat", [pv, v], f"present.{i}.value", axis=2)
        outputs.append(helper.make_tensor_value_info(ok, TensorProto.FLOAT, [1, nkv, "total_sequence", hd]))
        outputs.append(helper.make_tensor_value_info(ov, TensorProto.FLOAT, [1, nkv, "total_sequence", hd]))
        # grouped-query attention in 5-d: q [1,kv,g,S,hd], k/v [1,kv,1,T,hd]
        q5 = op("Reshape", [op("Mul", [q, scale]), const(np.array([1, nkv, g, -1, hd], np.int64))])
        k5 = op("Unsqueeze", [ok, const(np.array([2], np.int64))])
        v5 = op("Unsqueeze", [ov, const(np.array([2], np.int64))])
        scores = op("MatMul", [q5, op("Transpose", [k5], perm=[0, 1, 2, 4, 3])])  # [1,kv,g,S,T]
        probs = op("Softmax", [op("Add", [scores, mask])], axis=-1)
        ctx = op("MatMul", [probs, v5])  # [1,kv,g,S,hd]
        ctx = op("Reshape", [ctx, const(np.array([1, nh, -1, hd], np.int64))])
        ctx = op("Reshape", [op("Transpose", [ctx], perm=[0, 2, 1, 3]), const(np.array([1, -1, nh * hd], np.int64))])
        h = b.after_attention(h, ctx, i)
    b.logits(h)
    b.save(inputs, outputs, out_path, "decoder")


def build_native(cfg, tensors, out_dir):
    """The attention-free stages of the native path (tq-onnx computes attention on its cache):
    stage0 (embedding, layer 0 before attention), stage<i> for 0 < i < L (layer i-1 after
    attention, layer i before it) and stage<L> (layer L-1 after attention, the output head).

      stage<i>, i < L: inputs  input_ids i64 [1,S] (stage0) or hidden f32 [1,S,H] and
                               attention f32 [1,S,heads*head_dim] (the others); position_ids i64 [1,S]
                       outputs hidden [1,S,H], q [1,heads,S,head_dim], k and v [1,kv_heads,S,head_dim]
                               (q and k after RoPE; q not scaled)
      stage<L>:        inputs  hidden, attention; output logits f32 [1,S,vocab]
    """
    from onnx import TensorProto, helper

    L = cfg["num_hidden_layers"]
    H, nh, nkv, hd, V = (cfg[k] for k in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size"))
    os.makedirs(out_dir, exist_ok=True)
    f32 = lambda name, shape: helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)  # noqa: E731
    i64 = lambda name: helper.make_tensor_value_info(name, TensorProto.INT64, [1, "sequence"])  # noqa: E731
    for i in range(L + 1):
        b = GraphBuilder(cfg, tensors)
        if i == 0:
            inputs = [i64("input_ids"), i64("position_ids")]
            h = b.embed()
        else:
            inputs = [f32("hidden", [1, "sequence", H]), f32("attention", [1, "sequence", nh * hd])]
            if i < L:
                inputs.append(i64("position_ids"))
            h = b.after_attention("hidden", "attention", i - 1)
        if i < L:
            b.rope_tables()
            q, k, v = b.qkv(h, i)
            b.named("Identity", [h], "hidden_out")
            for src, out in [(q, "q"), (k, "k"), (v, "v")]:
                b.named("Identity", [src], out)
            outputs = [
                f32("hidden_out", [1, "sequence", H]),
                f32("q", [1, nh, "sequence", hd]),
                f32("k", [1, nkv, "sequence", hd]),
                f32("v", [1, nkv, "sequence", hd]),
            ]
        else:
            b.logits(h)
            outputs = [f32("logits", [1, "sequence", V])]
        b.save(inputs, outputs, os.path.join(out_dir, f"stage{i}.onnx"), f"stage{i}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--gguf")
    src.add_argument("--hf-dir")
    src.add_argument("--tiny", action="store_true")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    start = time.time()
    os.makedirs(args.out, exist_ok=True)
    if args.tiny:
        with tempfile.TemporaryDirectory() as tmp:
            write_tiny_hf(tmp, args.seed)
            cfg, tensors, tokenizer = load_hf_dir(tmp)
    elif args.gguf:
        cfg, tensors, tokenizer = load_gguf(args.gguf)
    else:
        cfg, tensors, tokenizer = load_hf_dir(args.hf_dir)
    log(
        f"{cfg['name']}: {cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, "
        f"{cfg['num_attention_heads']} heads / {cfg['num_key_value_heads']} kv heads of {cfg['head_dim']}, "
        f"vocab {cfg['vocab_size']}"
    )
    build_onnx(cfg, tensors, os.path.join(args.out, "model.onnx"))
    build_native(cfg, tensors, os.path.join(args.out, "native"))
    with open(os.path.join(args.out, "tokenizer.json"), "w") as f:
        json.dump(tokenizer, f, ensure_ascii=False)
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    size = sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(args.out) for f in files)
    log(f"wrote {args.out} ({size / 1e6:.1f} MB) in {time.time() - start:.1f} s")


if __name__ == "__main__":
    main()
