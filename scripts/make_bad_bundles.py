#!/usr/bin/env python3
"""Writes fixtures/bad-bundles/: small ONNX bundles that tq-onnx must reject with a typed error.

  f16-cache/        past/present key-values in float16
  encoder-decoder/  an `encoder_hidden_states` input
  no-logits/        outputs named `scores` instead of `logits`
Each has a 1-layer config.json and the tiny fixture's tokenizer.json. Needs numpy and onnx.
"""
import json
import os
import shutil

from onnx import TensorProto, helper

ROOT = os.path.join(os.path.dirname(__file__), "..", "fixtures")
OUT = os.path.join(ROOT, "bad-bundles")
CONFIG = {
    "model_type": "llama",
    "num_hidden_layers": 1,
    "hidden_size": 64,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "vocab_size": 384,
    "eos_token_id": 2,
}


def bundle(name, graph):
    d = os.path.join(OUT, name)
    os.makedirs(d, exist_ok=True)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    with open(os.path.join(d, "model.onnx"), "wb") as f:
        f.write(model.SerializeToString())
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(CONFIG, f, indent=1)
    shutil.copy(os.path.join(ROOT, "tiny-llama", "tokenizer.json"), os.path.join(d, "tokenizer.json"))


def decoder(dtype, extra_inputs=(), logits_name="logits"):
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "S"])
    pk = helper.make_tensor_value_info("past_key_values.0.key", dtype, [1, 2, "P", 32])
    pv = helper.make_tensor_value_info("past_key_values.0.value", dtype, [1, 2, "P", 32])
    ok = helper.make_tensor_value_info("present.0.key", dtype, [1, 2, "T", 32])
    ov = helper.make_tensor_value_info("present.0.value", dtype, [1, 2, "T", 32])
    lg = helper.make_tensor_value_info(logits_name, TensorProto.INT64, [1, "S"])
    nodes = [
        helper.make_node("Identity", ["past_key_values.0.key"], ["present.0.key"]),
        helper.make_node("Identity", ["past_key_values.0.value"], ["present.0.value"]),
        helper.make_node("Identity", ["input_ids"], [logits_name]),
    ]
    inputs = [ids, *extra_inputs, pk, pv]
    return helper.make_graph(nodes, "bad", inputs, [lg, ok, ov])


def main():
    bundle("f16-cache", decoder(TensorProto.FLOAT16))
    enc = helper.make_tensor_value_info("encoder_hidden_states", TensorProto.FLOAT, [1, "E", 64])
    bundle("encoder-decoder", decoder(TensorProto.FLOAT, extra_inputs=[enc]))
    bundle("no-logits", decoder(TensorProto.FLOAT, logits_name="scores"))
    print("wrote", OUT)


if __name__ == "__main__":
    main()
