"""Examples for the OpenAPI schema (shown on /docs): one realistic value for every request and response."""

from __future__ import annotations

from typing import Any

JOB_ID = "3f0c2a8e-5b1d-4c47-9a2e-7d7f4b1e9c20"
MODEL_ID = "8a1f6c3e-2d4b-4e8f-9c1a-5b7d3e2f1a09"
DATASET_ID = "c5e2b7a1-9d3f-4a6c-8e1b-2f4d6a8c0e13"
EVAL_ID = "d7a9c1e3-5f2b-4d8e-a6c4-1b3e5f7a9c24"
T0 = "2026-11-27T10:15:02.125000Z"

TENSOR_SPEC_EXAMPLE: dict[str, Any] = {"name": "image", "dtype": "float32", "shape": ["batch", 3, 32, 32]}

MODEL_EXAMPLE: dict[str, Any] = {
    "id": MODEL_ID,
    "filename": "resnet_tiny.onnx",
    "format": "onnx",
    "size_bytes": 1843200,
    "sha256": "e27d6365b184087e4d225e07f7c6cbd9609548dea34e6e7ef8329ef25176acad",
    "opset": 17,
    "inputs": [TENSOR_SPEC_EXAMPLE],
    "outputs": [{"name": "logits", "dtype": "float32", "shape": ["batch", 10]}],
    "created_at": T0,
}

ARRAY_SPEC_EXAMPLE: dict[str, Any] = {"dtype": "float32", "shape": [256, 3, 32, 32]}

DATASET_EXAMPLE: dict[str, Any] = {
    "id": DATASET_ID,
    "filename": "calib.npz",
    "size_bytes": 3146240,
    "sha256": "5d41402abc4b2a76b9719d911017c592ae5fd9c1d2ae6f53a7b0e6c1d3b9f6a2",
    "num_samples": 256,
    "arrays": {"image": ARRAY_SPEC_EXAMPLE, "labels": {"dtype": "int64", "shape": [256]}},
    "created_at": T0,
}

ACCURACY_TARGET_EXAMPLE: dict[str, Any] = {"metric": "label_accuracy", "max_drop": 0.01}

JOB_CREATE_EXAMPLE: dict[str, Any] = {
    "model_id": MODEL_ID,
    "calibration_dataset_id": DATASET_ID,
    "eval_dataset_id": EVAL_ID,
    "recipe": "int8_static",
    "options": {"method": "entropy", "batch_size": 8},
    "accuracy_target": ACCURACY_TARGET_EXAMPLE,
    "callback_url": "https://ci.example.com/hooks/lowbit",
}

JOB_LINKS_EXAMPLE: dict[str, Any] = {
    "self": f"/api/v1/jobs/{JOB_ID}",
    "artifact": f"/api/v1/jobs/{JOB_ID}/artifact",
    "report": f"/api/v1/jobs/{JOB_ID}/report",
    "page": f"/jobs/{JOB_ID}",
}

DELIVERY_EXAMPLE: dict[str, Any] = {
    "id": "0b6f3d2e-8c1a-4f5b-9e7d-3a2c1b0f9e8d",
    "event": "job.succeeded",
    "url": "https://ci.example.com/hooks/lowbit",
    "status": "delivered",
    "attempts": 2,
    "last_status_code": 200,
    "last_error": None,
    "created_at": "2026-11-27T10:15:41.002000Z",
    "last_attempt_at": "2026-11-27T10:15:42.031000Z",
    "delivered_at": "2026-11-27T10:15:42.031000Z",
}

JOB_EXAMPLE: dict[str, Any] = {
    "id": JOB_ID,
    "status": "succeeded",
    "stage": None,
    "progress": 100,
    "recipe": "int8_static",
    "options": {"method": "entropy", "per_channel": True, "batch_size": 8, "holdout_fraction": 0.2},
    "accuracy_target": ACCURACY_TARGET_EXAMPLE,
    "model_id": MODEL_ID,
    "calibration_dataset_id": DATASET_ID,
    "eval_dataset_id": EVAL_ID,
    "device": "cpu",
    "queue": "cpu",
    "created_at": T0,
    "started_at": "2026-11-27T10:15:03.410000Z",
    "finished_at": "2026-11-27T10:15:40.982000Z",
    "error": None,
    "links": JOB_LINKS_EXAMPLE,
    "callback_url": "https://ci.example.com/hooks/lowbit",
    "deliveries": [DELIVERY_EXAMPLE],
}

JOB_RUNNING_EXAMPLE: dict[str, Any] = {
    **JOB_EXAMPLE, "status": "running", "stage": "calibrating", "progress": 34, "finished_at": None,
    "deliveries": [],
}

JOB_FAILED_EXAMPLE: dict[str, Any] = {
    **JOB_EXAMPLE,
    "status": "failed",
    "stage": "preparing",
    "progress": 0,
    "error": {
        "code": "model_run_failed",
        "message": "ONNX Runtime could not run the model on the calibration data: input 'image' has a dimension "
        "mismatch (got 20, expected 16); check that the .npz arrays match the model's inputs",
    },
    "deliveries": [{**DELIVERY_EXAMPLE, "event": "job.failed", "attempts": 1}],
}

REPORT_EXAMPLE: dict[str, Any] = {
    "report_version": 1,
    "job_id": JOB_ID,
    "recipe": "int8_static",
    "options": {"method": "entropy", "per_channel": True, "batch_size": 8, "holdout_fraction": 0.2},
    "size": {"original_bytes": 1843200, "quantized_bytes": 478912, "ratio": 0.259831},
    "accuracy": {
        "samples": 64,
        "source": "eval_set",
        "overlap": {"evaluation_samples": 64, "shared_with_calibration": 0, "identical_to_calibration": False},
        "outputs": [{"name": "logits", "role": "classification", "role_source": "inferred",
                     "role_reason": "labels in [0, 10) were given", "samples": 64,
                     "cosine": 0.999412, "cosine_ci": [0.999207, 0.999581], "sqnr_db": 29.31,
                     "sqnr_db_ci": [27.86, 30.77], "identical": False, "max_abs_error": 0.0871,
                     "top1_agreement": 0.984375, "top1_agreement_ci": [0.953125, 1.0]}],
        "labels": {"output": "logits", "samples": 64, "original": 0.921875, "quantized": 0.90625,
                   "delta": -0.015625, "original_ci": [0.84375, 0.984375], "quantized_ci": [0.828125, 0.96875],
                   "delta_ci": [-0.046875, 0.0]},
    },
    "accuracy_target": {**ACCURACY_TARGET_EXAMPLE, "value": 0.90625, "met": False},
    "latency": {"provider": "CPUExecutionProvider", "batch_size": 1, "threads": 4, "original_ms_p50": 1.912,
                "quantized_ms_p50": 0.744, "speedup": 2.57, "speedup_ci": [2.4451, 2.6918],
                "speedup_measurable": True, "runs": 30, "order": "interleaved"},
    "layers": [{"name": "/conv1/Conv", "op_type": "Conv", "precision": "int8", "sqnr_db": 38.2},
               {"name": "/fc/Gemm", "op_type": "Gemm", "precision": "int8", "sqnr_db": 31.7}],
    "calibration": {"method": "entropy", "samples": 192, "seconds": 2.41},
    "warnings": [],
    "environment": {"lowbit": "0.1.0", "onnxruntime": "1.20.1", "onnx": "1.17.0", "torch": "2.13.0+cpu",
                    "python": "3.11.7"},
    "model": {"inputs": [{"name": "image", "dtype": "float32", "shape": ["batch", 3, 32, 32]}],
              "outputs": [{"name": "logits", "dtype": "float32", "shape": ["batch", 10]}], "opset": 17,
              "original_sha256": "5f0c" + "0" * 60, "quantized_sha256": "9a1e" + "0" * 60,
              "preprocessing": [], "source_format": "onnx", "export": None},
}

EVENTS_EXAMPLE = (
    "retry: 2000\n\n"
    "event: job\n"
    f'data: {{"id": "{JOB_ID}", "status": "queued", "stage": null, "progress": 0, "...": "..."}}\n\n'
    "event: stage\n"
    'data: {"stage": "preparing", "started_at": "2026-11-27T10:15:03.410000Z", "finished_at": null}\n\n'
    "event: job\n"
    f'data: {{"id": "{JOB_ID}", "status": "running", "stage": "preparing", "progress": 0, "...": "..."}}\n\n'
    ": keep-alive\n\n"
    "event: stage\n"
    'data: {"stage": "calibrating", "started_at": "2026-11-27T10:15:05.020000Z", "finished_at": null}\n\n'
    "event: end\n"
    f'data: {{"id": "{JOB_ID}", "status": "succeeded", "stage": null, "progress": 100, "...": "..."}}\n\n'
)

METRICS_EXAMPLE = """# HELP lowbit_jobs Jobs in the database, by status and recipe.
# TYPE lowbit_jobs gauge
lowbit_jobs{recipe="int8_static",status="succeeded"} 12.0
lowbit_jobs{recipe="int8_static",status="failed"} 1.0
# HELP lowbit_queue_depth Jobs waiting for a worker (status queued), by queue.
# TYPE lowbit_queue_depth gauge
lowbit_queue_depth{queue="cpu"} 2.0
# HELP lowbit_live_workers Workers alive now (heartbeat not expired) that consume each queue.
# TYPE lowbit_live_workers gauge
lowbit_live_workers{queue="cpu"} 1.0
lowbit_live_workers{queue="gpu"} 0.0
# HELP lowbit_job_duration_seconds Time from a worker starting a job to its end, by recipe and final status.
# TYPE lowbit_job_duration_seconds histogram
lowbit_job_duration_seconds_bucket{le="1.0",recipe="int8_static",status="succeeded"} 0.0
lowbit_job_duration_seconds_bucket{le="+Inf",recipe="int8_static",status="succeeded"} 12.0
lowbit_job_duration_seconds_sum{recipe="int8_static",status="succeeded"} 241.7
lowbit_job_duration_seconds_count{recipe="int8_static",status="succeeded"} 12.0
"""


def error_example(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


ERROR_EXAMPLES: dict[int, dict[str, Any]] = {
    400: error_example("bad_request", "the request is malformed"),
    401: error_example("authentication_required",
                       "this server requires an API key: send 'Authorization: Bearer <key>' (lowbit keys create)"),
    404: error_example("job_not_found", f"no job with id '{JOB_ID}'"),
    409: error_example("no_artifact", "the job is running; an artifact exists only for succeeded jobs"),
    413: error_example("upload_too_large", "the upload is larger than the limit of 2147483648 bytes"),
    429: error_example("rate_limited", "tenant 'acme' may upload 30 files a minute; retry in 12 s"),
    415: error_example("unsupported_media_type",
                       "unsupported content type 'text/plain'; send application/json or multipart/form-data"),
    410: error_example("artifact_expired", "the job's files were removed on 2026-12-30 after the 30-day "
                       "retention (LOWBIT_RETENTION_DAYS); its report stays: submit the job again for a new artifact"),
    422: error_example("invalid_request", "recipe: Field required"),
    507: {"error": {"code": "storage_quota_exceeded",
                    "message": "tenant 'acme' keeps 980.0 MB of uploads and artifacts and may keep 1.0 GB "
                    "(LOWBIT_TENANT_STORAGE_QUOTA_BYTES); this upload adds 52.4 MB: delete finished jobs "
                    "(DELETE /api/v1/jobs/ID) to free their artifacts, or ask for a larger quota",
                    "used_bytes": 980000000, "quota_bytes": 1000000000, "adding_bytes": 52400000}},
    503: error_example("broker_unavailable",
                       "the job queue is unreachable; the job was recorded as failed, try again shortly"),
}
