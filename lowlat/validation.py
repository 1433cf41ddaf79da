"""Argument checks that run on the host before any kernel: each failure names the argument and value."""

from __future__ import annotations

import torch

from .errors import ArgumentError, ArgumentTypeError

TOPK_DTYPES = (torch.int64, torch.int32)
BF16, FLOAT32, INT32, INT64 = (torch.bfloat16,), (torch.float32,), (torch.int32,), (torch.int64,)


def tensor(name: str, value, dtypes: tuple[torch.dtype, ...], shape: tuple | None = None, device: torch.device | None = None, *,
           ndim: int | None = None, contiguous: bool = True) -> torch.Tensor:
    """Check a tensor argument.  ``shape`` entries may be ``None`` for "any size"."""
    # The common case in one test (this runs on every call's host path); the checks below name the problem.
    if (isinstance(value, torch.Tensor) and value.dtype in dtypes and (device is None or value.device == device)
            and (not contiguous or value.is_contiguous())):
        actual = value.shape
        if actual == shape:  # an exact shape (no None entries) that matches: the usual case
            return value
        if shape is None:
            if ndim is None or len(actual) == ndim:
                return value
        elif len(actual) == len(shape):
            if None in shape:
                for size, wanted in zip(actual, shape):  # a loop, not all(<generator>): this is the hot path
                    if wanted is not None and size != wanted:
                        break
                else:
                    return value
    if not isinstance(value, torch.Tensor):
        raise ArgumentTypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in dtypes:
        expected = " or ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ArgumentTypeError(f"{name} must have dtype {expected}, got {str(value.dtype).replace('torch.', '')}")
    expected_ndim = len(shape) if shape is not None else ndim
    if expected_ndim is not None and value.dim() != expected_ndim:
        raise ArgumentError(f"{name} must be {expected_ndim}-D, got shape {tuple(value.shape)}")
    if shape is not None:
        for dim, (actual, wanted) in enumerate(zip(value.shape, shape)):
            if wanted is not None and actual != wanted:
                raise ArgumentError(f"{name} must have shape {_fmt(shape)}, got {tuple(value.shape)} (dimension {dim})")
    if device is not None and value.device != device:
        raise ArgumentError(f"{name} must be on {device}, got {value.device}")
    if contiguous and not value.is_contiguous():
        raise ArgumentError(f"{name} must be contiguous (got strides {value.stride()} for shape {tuple(value.shape)})")
    return value


def _fmt(shape) -> str:
    return "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"


def flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ArgumentTypeError(f"{name} must be a bool, got {value!r}")
    return value


def flags(names: tuple[str, ...], *values) -> None:
    """Every value must be a bool: ``flags(("use_fp8", "async_finish"), use_fp8, async_finish)``."""
    for value in values:
        if value is not True and value is not False:
            for name, value in zip(names, values):
                flag(name, value)


def num_tokens_arg(value, num_rows: int, device: torch.device) -> tuple[int, torch.Tensor | None]:
    """``num_tokens``: None (all ``num_rows``), a host int in [0, num_rows], or an int32 device scalar
    (checked on the device; lets one captured graph serve every batch size up to ``num_rows``)."""
    if value is None:
        return num_rows, None
    if isinstance(value, torch.Tensor):
        tensor("num_tokens", value, dtypes=(torch.int32,), device=device)
        if value.numel() != 1:
            raise ArgumentError(f"num_tokens as a tensor must hold one element, got shape {tuple(value.shape)}")
        return num_rows, value
    if isinstance(value, bool) or not isinstance(value, int):
        raise ArgumentTypeError(f"num_tokens must be None, an int or an int32 device tensor, got {type(value).__name__}")
    if not 0 <= value <= num_rows:
        raise ArgumentError(f"num_tokens={value} must be in [0, {num_rows}] (x has {num_rows} rows)")
    return value, None


def routing(topk_idx: torch.Tensor, num_experts: int, num_tokens: int) -> None:
    """Full check of expert indices (range and duplicates inside a row); synchronises with the device,
    so the Buffer runs it only when asked to (``validate_routing=True``) and never during capture."""
    rows = topk_idx[:num_tokens].to(torch.int64)
    bad = (rows < -1) | (rows >= num_experts)
    if bool(bad.any()):
        token, k = (int(i) for i in bad.nonzero()[0])
        raise ArgumentError(f"topk_idx[{token}, {k}]={int(rows[token, k])} is outside [-1, {num_experts})")
    ordered = rows.sort(dim=1).values
    duplicate = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)
    if bool(duplicate.any()):
        token = int(duplicate.nonzero()[0][0])
        raise ArgumentError(f"topk_idx row {token} names an expert twice: {rows[token].tolist()}")
