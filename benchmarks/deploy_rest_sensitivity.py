"""Which INT8-rest tensors move the deployable ONNX's mAP: encode a model's plain FP32 ONNX (as deploy_onnx.py left it
in its workdir) with some conv weights kept float, validate each through stock Ultralytics (onnxruntime, batch 1).

  python benchmarks/deploy_rest_sensitivity.py   (stage 1 of the 640-trained chain, at 320; paths below)
"""
import json
import onnx
from onnx import numpy_helper
from yolo_tq.formats.deploy_onnx import conv_weight_names, encode_model
from yolo_tq.eval.validate import validate
src = "benchmarks/work/deploy/stage 1/320/stage 1_fp32.onnx"
m = onnx.load(src)
names = conv_weight_names(m)
size = {t.name: numpy_helper.to_array(t).size for t in m.graph.initializer}
variants = {
    "int8 (dfl float)": ["model.23.dfl.conv.weight"],
    "+ layers 0-1 float": ["model.23.dfl.conv.weight", "model.0.conv.weight", "model.1.conv.weight"],
    "+ Detect head float": [n for n in names if n.startswith("model.23.")],
    "+ convs < 5000 weights float": [n for n in names if size[n] < 5000],
}
out = {}
for label, keep in variants.items():
    enc, done = encode_model(m, "int8", keep_float=keep)
    path = f"benchmarks/work/rest_sens/{len(out)}.onnx"
    onnx.save(enc, path)
    r = validate(path, "/work/shared/datasets/coco128/coco128.yaml", 320, 1, "cpu")
    import os
    out[label] = {"kept_float": len(keep), "bytes": os.path.getsize(path), "mAP50-95": r["mAP50-95"]}
    print(label, out[label], flush=True)
json.dump(out, open("benchmarks/work/rest_sens/result.json", "w"), indent=1)
