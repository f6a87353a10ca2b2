"""The teaching texts of `onnxq --help` and its commands: what happens, the choices, one example per option."""

DESCRIPTION = """\
onnxq turns a floating-point ONNX model into an INT8 model with QuantizeLinear/DequantizeLinear
(Q/DQ) nodes that ONNX Runtime runs and TensorRT compiles.

A typical session:
  onnxq quantize model.onnx --calib calib.npz -o model.int8.onnx
  onnxq compare model.onnx model.int8.onnx --data eval.npz     how far INT8 is from FP32
  onnxq lint model.int8.onnx --target tensorrt                   TensorRT's Q/DQ rules, rule by rule
  onnxq inspect model.int8.onnx                                  what is quantized, what is not and why
  onnxq view model.int8.onnx                                     the graph in Netron, with onnxq's record
  onnxq report model.onnx model.int8.onnx --data eval.npz -o report.html   all of it on one HTML page
  onnxq build-engine model.int8.onnx -o model.plan               a TensorRT engine (needs tensorrt)

Calibration data (--calib, --data) is an .npz with one array per model input, keyed by input name,
samples stacked on axis 0 (ModelOpt's --calibration_data format); an .npy for a single-input model;
or a folder of such files. Use samples like the deployment's inputs; onnxq's benchmarks calibrate
with 128 image crops (MobileNetV2), 256 sentences and words (MiniLM) and 16 windows of 256 tokens
(SmolLM2)."""

QUANTIZE_EPILOG = """\
what happens:
  The recipe's passes run in order; each is checked (ONNX checker + shape inference) and exact
  passes are verified to leave the outputs unchanged on a calibration sample. The quantize step
  collects activation statistics through ONNX Runtime batch by batch and inserts Q/DQ nodes.
  What ran is written into the model's metadata, visible in Netron and `onnxq inspect`.

keeping nodes in float (like ORT's nodes_to_exclude / op_types_to_quantize, ModelOpt's --nodes_to_exclude):
  --exclude NAME_OR_REGEX (node names as your model has them, also generic exporter names such as
  node_matmul_3 that onnxq renames) and --op-types OP,OP join the recipe's quantize-step exclude. A pattern that
  matches no node, or an op type the model lacks, is a warning. A weighted layer kept in float breaks
  lint rule R8 (R8o for ort-cpu): the model is still written, the exit status is 4, stderr names the rule,
  the nodes, and that the failure follows from your exclusion.

recipes (--recipe NAME or a YAML/JSON file; `onnxq recipes` lists them):
  default          canonicalise, fold BatchNorm, equalise Conv chains, INT8 Q/DQ
  transformer-w8a8 picked by itself for a recognised transformer: fold norms, rotate, smooth what is not
                   rotated, split heavy-tailed inputs, INT8 Q/DQ (also transformer-w4a8, transformer-w4a4)
  full-int8        transformer-w8a8 + every nonlinear op as a lookup table or integer subgraph
  petr-w8a8, petr-w8a8-pe-fold, petr-full-int8   PETR camera position embedding handled (QFPE / folded)
  mamba-w8a8, mamba-w4a8   picked by itself for a recognised Mamba LM: KLT+Hadamard stream rotation,
                   smooth-fused rotation at out_proj, selective scan kept float
  rwkv-w8a8, rwkv-w4a8     picked by itself for a recognised RWKV LM: per layer, codebook (VQ) or
                   scalar weights as RWKVQuant's proxy chooses

targets:
  tensorrt   symmetric INT8, zero point 0, Q/DQ on weighted-layer inputs (TensorRT explicit quantization)
  ort-cpu    asymmetric UINT8 activations, Q/DQ around every op with an ORT integer kernel (fast on CPU)

calibrators (activations):
  percentile  99.99th percentile of |x| (default)            max          largest magnitude seen
  entropy     TensorRT's KL-divergence threshold             mse          least squared INT8 error
  auto        each of the above tried on a copy; the one whose outputs stay nearest FP32 is kept

weight rounding (--rounding):
  nearest     each weight to its nearest integer (default of the default recipe; fast)
  gptq        integers chosen so each layer's output on its calibration inputs moves least (GPTQ),
              damping picked per layer on held-out batches; the transformer and PETR pe-fold recipes
              use it (slower; needs torch)
  adaround    learned per block: each weight's up/down choice fitted so the block's output on its
              quantized inputs matches the float block's (AdaRound; minutes per model on a CPU,
              faster on a GPU; needs torch; learn_iterations in the recipe sets the steps per block)
  flexround   learned per block like adaround, dividing each weight by learned element-wise,
              per-channel and step factors before rounding (FlexRound)

examples:
  onnxq quantize mobilenet.onnx --calib photos.npz -o mobilenet.int8.onnx
  onnxq quantize mobilenet.onnx --calib photos.npz -o m.int8.onnx --per-tensor --calibrator mse
  onnxq quantize bert.onnx --calib sentences.npz -o bert.int8.onnx --target ort-cpu
  onnxq quantize llm.onnx --calib windows.npz -o llm.w4a8.onnx --recipe transformer-w4a8
  onnxq quantize m.onnx --calib c.npz -o q.onnx --exclude fc/Gemm --exclude '/head/.*'   keep nodes in float
  onnxq quantize m.onnx --calib c.npz -o q.onnx --op-types Conv,MatMul     quantize only these op types
  onnxq quantize m.onnx --calib c.npz -o q.onnx --log-level debug           options and details of every pass
  onnxq quantize m.onnx --calib c.npz -o q.onnx --report r.json --report-html r.html   the record as JSON and as a page"""

COMPARE_DESCRIPTION = """\
Run both models on the same data and report, per output, how far the quantized one is from the
reference, and the per-layer SQNR of tensors the two graphs share (worst first).

outputs:
  float outputs     mean cosine per sample, SQNR (dB), max |error|; and top-1 agreement when the output
                    is a class distribution: its last axis has >= 2 entries and it comes from a
                    Softmax/LogSoftmax over that axis or feeds an ArgMax/TopK, or it is a rank-2
                    [batch, classes] output of a Gemm/MatMul classifier head. Other outputs (embedding
                    vectors, [batch, seq, hidden] states) say "not a class distribution".
  integer/bool      "identical", or "N of M elements differ" (class ids, token ids, masks)
  padding           positions where --padding-mask is 0 are left out, as quantize leaves them out of
                    calibration (default auto: an integer/bool input named attention_mask)

examples:
  onnxq compare model.onnx model.int8.onnx --data eval.npz
  onnxq compare bert.onnx bert.int8.onnx --data eval.npz --batch-size 16 --padding-mask attention_mask
  onnxq compare model.onnx model.int8.onnx --data eval.npz --layers -1 --json compare.json"""

LINT_DESCRIPTION = """\
Check a Q/DQ model against the Q/DQ rules of its deployment target that can be checked statically.
Exit status 4 when an error-level rule fails (warnings do not fail).

profiles (--target):
  tensorrt   symmetric INT8 (zero points 0, no UINT8), TensorRT's Q/DQ placement (docs/tensorrt-rules.md)
  ort-cpu    what quantize --target ort-cpu writes: UINT8 activations with zero points and Q/DQ around
             every op with an ORT integer kernel are expected; scales, Q/DQ pairs, quantized weighted
             layers and signed weights are checked (docs/ort-cpu.md)

examples:
  onnxq lint model.int8.onnx
  onnxq lint model.cpu.int8.onnx --target ort-cpu -v"""

EXPORT_DESCRIPTION = """\
Export a PyTorch model to ONNX in the form onnxq recognises and TensorRT reads, then check that
ONNX Runtime's outputs match torch's on the example inputs (nothing is written if they do not).

SOURCE is a Hugging Face model folder (config.json + weights, as save_pretrained writes them),
loaded in FP32 with eager attention and no KV cache (AutoModelForCausalLM when the config names a
*ForCausalLM, output logits; AutoModel otherwise, output last_hidden_state); the example inputs are
random input_ids and an attention_mask with some padding, batch and sequence axes dynamic. SOURCE
may also be file.py:factory, a function returning (module, example_inputs); axis 0 is dynamic.

The dynamo exporter (opset 18) is tried first, the TorchScript exporter (opset 17) if it fails.

  onnxq export ./my-llama -o llama.onnx
  onnxq export ./my-bert -o bert.onnx --seq-len 128 --exporter torchscript
  onnxq export net.py:make_model -o net.onnx"""

REPORT_DESCRIPTION = """\
Write one self-contained HTML page (no network needed to open it) showing what a quantization did:
recipe, target and passes with their results (from the quantized model's metadata); per-output and
per-layer SQNR and cosine on --data, worst layer first (as compare); each quantized activation's clip
(scale × qmax) against its observed range, with a histogram; each quantized weight's range per output
channel; outlier channels; what stayed float and why; lint rule by rule; the error of nonlinear-op
replacements. How to read it: docs/report.md.

examples:
  onnxq report model.onnx model.int8.onnx --data eval.npz -o report.html
  onnxq report bert.onnx bert.int8.onnx --data eval.npz -o report.html --batch-size 16 --max-samples 64"""
