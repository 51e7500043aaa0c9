"""The options recipes share, declared once; each recipe's table picks from these (and may change a default,
the help or a requirement with ``Option.with_``).

``ORDER`` is the order options are checked in, whatever the recipe: when a request has several bad options,
the first one in this order is the one reported, as it always was.
"""

from __future__ import annotations

from worker.engine.recipes.base import Conflict, Option

CALIBRATION_METHODS = ("minmax", "entropy", "percentile", "mse")
CALIBRATORS = ("lowbit", "ort")
INT4_ALGORITHMS = ("rtn", "hqq", "k_quant", "gptq", "clip_search")
# Algorithms that learn from the calibration set (so its samples never validate).
INT4_CALIBRATED = ("gptq", "clip_search")
BLOCK_SIZES = (16, 32, 64, 128)
# auto: what the choice among candidates that meet the target optimises (see worker/engine/auto.py).
AUTO_PREFERENCES = ("size_and_speed", "size")
# auto: which steps the search takes before it keeps layers in float (see worker/engine/auto.py).
AUTO_SEARCHES = ("full", "float_fallback")
# What an output is for, which decides the figures it gets (declared in options.outputs, else inferred).
OUTPUT_ROLES = ("classification", "multilabel", "embedding", "detection", "regression", "other")

# -- every recipe --------------------------------------------------------------------------------------------
BATCH_SIZE = Option("batch_size", "int", 8, "samples per model run, for models with a dynamic batch axis",
                    lo=1, hi=1024)
HOLDOUT_FRACTION = Option("holdout_fraction", "float", 0.2, "share of the calibration set held out to validate "
                          "when there is no evaluation set", lo=0.05, hi=0.5)
NODES_TO_EXCLUDE = Option("nodes_to_exclude", "names", (), "node names kept in float")
LATENCY_RUNS = Option("latency_runs", "int", 30, "timed runs of each model for the latency figures (at most: "
                      "they stop after 0.75 s of timed runs once 10 are done)", lo=1, hi=1000)
OUTPUTS = Option("outputs", "roles", (), "declared output roles ({name: role}); outputs not named get an inferred "
                 f"role ({', '.join(OUTPUT_ROLES)})")
COMMON = (BATCH_SIZE, HOLDOUT_FRACTION, NODES_TO_EXCLUDE, LATENCY_RUNS, OUTPUTS)

# -- calibration ---------------------------------------------------------------------------------------------
METHOD = Option("method", "choice", "minmax", "how activation ranges are chosen from the calibration data",
                choices=CALIBRATION_METHODS)
CALIBRATOR = Option(
    "calibrator", "choice", "lowbit", "lowbit's streaming calibrator, or ort (ONNX Runtime's own, to compare)",
    choices=CALIBRATORS,
    conflicts=(Conflict("ort", "method", "mse",
                        "ONNX Runtime's calibrators have no 'mse' method; use calibrator 'lowbit'"),),
)
PERCENTILE = Option("percentile", "float", 99.99, "method percentile: the central share of values kept",
                    lo=90.0, hi=100.0, open_hi=True)
SYMMETRIC_ACTIVATIONS = Option("symmetric_activations", "bool", False, "symmetric activation ranges")
FLOAT_INDEX_MATH = Option("float_index_math", "bool", True, "nodes that compute shapes, indices or coordinates "
                          "(from Shape/Range, or feeding Floor/Round, comparisons, casts to integers and shape or "
                          "index inputs) stay in float: 8 bits would move resize sizes, box corners and thresholds")
MAX_CALIBRATION_SAMPLES = Option("max_calibration_samples", "int", 512, "calibration samples used, at most",
                                 lo=1, hi=100_000)

# -- int8 weights --------------------------------------------------------------------------------------------
PER_CHANNEL = Option("per_channel", "bool", True, "one int8 weight scale per output channel")
REDUCE_RANGE = Option("reduce_range", "bool", None, "7-bit weights, for CPUs whose int8 kernels overflow (not set: "
                      "on where the worker's CPU is one: x86-64 without VNNI)", nullable=True)
OP_TYPES_TO_QUANTIZE = Option("op_types_to_quantize", "names", (), "only these operator types (default: all "
                              "the quantizer takes)")
# SmoothQuant (worker/engine/smoothquant.py): auto smooths the MatMul/Gemm inputs whose channel spread is large.
SMOOTHQUANT_MODES = ("auto", "on", "off")
SMOOTHQUANT = Option("smoothquant", "choice", "auto", "move activation outliers of MatMul/Gemm inputs into the "
                     "weights before calibrating (auto: where a channel's max is far above the median channel's)",
                     choices=SMOOTHQUANT_MODES)
SMOOTHQUANT_ALPHA = Option("smoothquant_alpha", "float", 0.5, "SmoothQuant's migration strength: 0 leaves the "
                           "activations as they are, 1 moves all their range into the weights", lo=0.0, hi=1.0)
# Cross-layer equalization and bias correction (worker/engine/conv_refine.py): auto keeps each only where it
# lowers the output noise on the calibration samples.
REFINE_MODES = ("auto", "on", "off")
EQUALIZE = Option("equalize", "choice", "auto", "cross-layer equalization of Conv -> (ReLU/LeakyReLU/PReLU/pool) -> "
                  "Conv chains before calibrating (auto: kept where it lowers the output error on the calibration "
                  "samples)", choices=REFINE_MODES)
BIAS_CORRECTION = Option("bias_correction", "choice", "auto", "subtract the mean output shift of int8 weight "
                         "rounding from Conv/Gemm biases (auto: kept where it lowers the output error on the "
                         "calibration samples)", choices=REFINE_MODES)
# Learned rounding (worker/engine/adaround.py): off by default (it costs up to adaround_seconds more per job).
ADAROUND = Option("adaround", "choice", "off", "learn each Conv/Gemm/MatMul int8 weight's rounding (up or down) to "
                  "lower the layer's output error on the calibration samples, AdaRound-style (auto: kept where it "
                  "lowers the output error on the calibration samples)", choices=REFINE_MODES)
ADAROUND_SECONDS = Option("adaround_seconds", "float", 120.0, "time budget of the rounding optimisation, shared by "
                          "the layers (each gets at least 50 steps)", lo=1.0, hi=3600.0)
# The residual stream of transformer blocks in 16 bits, Softmax in float (worker/engine/residual16.py).
RESIDUAL_16BIT = Option("residual_16bit", "choice", "auto", "transformer blocks: LayerNorm inputs, residual Adds and "
                        "the output projections feeding them in 16 bits, Softmax in float (auto: where the graph has "
                        "them and it lowers the output error on the calibration samples)", choices=REFINE_MODES)
# A16W8 (worker/engine/ort_quant.py's a16_tensors): these activations get 16-bit QDQ instead of uint8.
ACTIVATIONS_16BIT = Option("activations_16bit", "names", (), "activation tensors, or nodes whose outputs, get "
                           "16-bit QDQ instead of 8-bit (A16W8; same calibrated range, opset 21 Q/DQ)")
LAYER_SENSITIVITY = Option("layer_sensitivity", "bool", False, "also measure each layer's sensitivity (one model "
                           "run per layer and sample)")

# -- int4 ----------------------------------------------------------------------------------------------------
ALGORITHM = Option("algorithm", "choice", None, "4-bit algorithm (default clip_search with calibration data, "
                   "else rtn)", choices=INT4_ALGORITHMS, nullable=True)
BLOCK_SIZE = Option("block_size", "choice", 32, "weights per 4-bit block", choices=BLOCK_SIZES)
SYMMETRIC = Option("symmetric", "bool", True, "symmetric 4-bit weights (no zero points)")
ACCURACY_LEVEL = Option("accuracy_level", "int", 0, "MatMulNBits' compute precision", lo=0, hi=4)
INT8_NODES = Option("int8_nodes", "names", (), "MatMul node names kept in 8 bits (MatMulNBits bits=8) instead of 4")
INT8_LAST_MATMUL = Option("int8_last_matmul", "bool", False, "the last MatMul (an LLM's lm_head) in 8 bits "
                          "instead of 4")
INT8_MOST_SENSITIVE = Option("int8_most_sensitive", "int", 0, "also keep in 8 bits the N MatMuls whose weights lose "
                             "most in 4 bits (relative error, weighted by each input's per-channel second moments "
                             "when clip_search measured them)", lo=0, hi=4096)
FOUR_BIT_WEIGHTS = Option("four_bit_weights", "bool", False, "store the int8 model's Conv/MatMul/Gemm "
                          "weights in 4 bits (INT4, per output channel, a Cast to int8 that ONNX Runtime folds at "
                          "load: the same int8 kernels, half the weight bytes; opset 21)")
QUANTIZE_EMBEDDINGS = Option("quantize_embeddings", "bool", False, "also 4-bit Gather tables")
INT8_ACTIVATIONS = Option("int8_activations", "bool", False, "also quantize everything outside the 4-bit MatMuls "
                          "to int8 QDQ, calibrated on the 4-bit model (needs calibration data)")

# -- fp16 ----------------------------------------------------------------------------------------------------
KEEP_IO_TYPES = Option("keep_io_types", "bool", True, "float32 inputs and outputs")
OP_BLOCK_LIST = Option("op_block_list", "names", None, "op types kept in float32 (default: the converter's "
                       "unsafe list)", nullable=True)

# -- qat_int8 ------------------------------------------------------------------------------------------------
STEPS = Option("steps", "int", 200, "Adam steps on the calibration samples", lo=1, hi=100_000)
LEARNING_RATE = Option("learning_rate", "float", 0.05, "weights' learning rate, relative to each tensor's int8 "
                       "step", lo=0.0, hi=1000.0)
RANGE_LEARNING_RATE = Option("range_learning_rate", "float", 0.05, "learning rate of the quantization ranges",
                             lo=0.0, hi=1000.0)
TRAIN_WEIGHT_RANGES = Option("train_weight_ranges", "bool", False, "learn the weights' ranges")
TRAIN_ACTIVATION_RANGES = Option("train_activation_ranges", "bool", True, "learn the activations' ranges")
TASK_LOSS = Option("task_loss", "bool", False, "add a cross-entropy term on the labels to the distillation loss")
TRAIN_MEMORY_MB = Option("train_memory_mb", "float", 1024.0, "what one backward pass may save for its gradients; "
                         "a batch that would save more is trained in parts whose gradients add up (the same "
                         "training, in more passes)", lo=0.0001, hi=1_000_000.0)

# -- auto ----------------------------------------------------------------------------------------------------
MAX_FALLBACK_STEPS = Option("max_fallback_steps", "int", 8, "layers kept in float per candidate recipe, at most "
                            "(on a 4-bit branch: steps keeping its MatMuls in 8 bits, 1, 2, 4, ... of them)",
                            lo=0, hi=64)
PREFER = Option("prefer", "choice", "size_and_speed", "size_and_speed: the smallest not slower than fp32; size: "
                "the smallest however slow", choices=AUTO_PREFERENCES)
SEARCH = Option("search", "choice", "full", "full: 16-bit activations, SmoothQuant, equalization, bias correction, "
                "the 16-bit residual stream, learned rounding, whole blocks, 4-bit models' MatMuls in 8 bits and "
                "int8 models' weights in 4 bits are tried before and beside layers kept in float; float_fallback: "
                "plain int8 candidates and layers kept in float only (the search without those steps, to compare)",
                choices=AUTO_SEARCHES,
                conflicts=(Conflict("float_fallback", "smoothquant", "on",
                                    "search 'float_fallback' tries no SmoothQuant; leave smoothquant unset or use "
                                    "search 'full'"),))

ORDER = (
    "method", "calibrator",
    "per_channel", "symmetric_activations", "reduce_range", "symmetric", "int8_last_matmul", "quantize_embeddings",
    "four_bit_weights", "int8_activations", "layer_sensitivity", "keep_io_types", "train_weight_ranges",
    "train_activation_ranges", "task_loss", "percentile", "batch_size", "max_calibration_samples", "holdout_fraction",
    "latency_runs",
    "algorithm", "block_size", "steps", "learning_rate", "range_learning_rate", "train_memory_mb",
    "max_fallback_steps", "prefer",
    "accuracy_level", "nodes_to_exclude", "int8_nodes", "int8_most_sensitive", "op_types_to_quantize",
    "op_block_list", "outputs",
    "smoothquant", "smoothquant_alpha", "equalize", "bias_correction", "adaround", "adaround_seconds",
    "residual_16bit", "activations_16bit", "search", "float_index_math",
)
