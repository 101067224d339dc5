"""Fused shifted-window attention for the seg teacher's Swin encoder: one SDPA call per block, with the
relative-position bias and the shift mask added inside the kernel.

transformers' Swin hands `scaled_dot_product_attention` bias + shift mask materialised per image and
window (batch x windows x heads x L x L, written and read again in every shifted block). Here the mask
is built once per block for all images (windows x heads x L x L) and broadcast over the batch, by
putting the windows beside the heads: queries (batch, windows * heads, L, head_dim). Cost: q, k and v
are copied once into that layout (the three projections run as one GEMM). Same arithmetic otherwise:
the targets match transformers' to float rounding (tests/test_swin_attention.py).
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from .config import SWIN_ATTENTION

_NEEDED = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "relative_position_bias",
    "num_attention_heads",
    "head_dim",
    "scaling",
)


def fused_window_attention(
    self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
) -> tuple[torch.Tensor, None]:
    """SwinAttention.forward: (batch * windows, L, C) and the shift mask (windows, L, L) or None -> (out, None)."""
    windows_total, length, channels = hidden_states.shape
    heads, head_dim = self.num_attention_heads, self.head_dim
    projections = (self.q_proj, self.k_proj, self.v_proj)
    weight = torch.cat([p.weight for p in projections])
    bias = torch.cat([p.bias for p in projections]) if self.q_proj.bias is not None else None
    qkv = F.linear(hidden_states, weight, bias)  # (batch * windows, L, 3C)
    position_bias = self.relative_position_bias()  # (1, heads, L, L)
    if attention_mask is None:  # unshifted block: the bias alone, broadcast over batch and windows
        q, k, v = qkv.view(windows_total, length, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=position_bias, scale=self.scaling)
        out = out.transpose(1, 2)  # (batch * windows, L, heads, head_dim)
    else:  # shifted block: the mask differs per window, so the windows join the heads
        windows = attention_mask.shape[0]
        batch = windows_total // windows
        mask = (position_bias + attention_mask.unsqueeze(1)).reshape(1, windows * heads, length, length)
        qkv = qkv.view(batch, windows, length, 3, heads, head_dim).permute(3, 0, 1, 4, 2, 5)
        q, k, v = qkv.reshape(3, batch, windows * heads, length, head_dim)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scaling)
        out = out.view(batch, windows, heads, length, head_dim).transpose(
            2, 3
        )  # (batch, windows, L, heads, d)
    return self.o_proj(out.reshape(windows_total, length, channels)), None


def swin_attention_modules(encoder: nn.Module) -> list[nn.Module]:
    """The encoder's window-attention modules (transformers' `SwinAttention`)."""
    return [m for m in encoder.modules() if type(m).__name__ == "SwinAttention"]


def use_fused_window_attention(encoder: nn.Module, choice: str, where: str) -> int:
    """Replace every SwinAttention's forward with `fused_window_attention` (choice fused or auto);
    -> blocks replaced. auto leaves a layout it does not know to transformers; fused refuses it."""
    if choice not in SWIN_ATTENTION:
        raise ValueError(f"--swin-attention {choice!r} is not one of {', '.join(SWIN_ATTENTION)}")
    modules = swin_attention_modules(encoder)
    if choice == "transformers" or not modules:
        return 0
    unknown = [name for name in _NEEDED if not hasattr(modules[0], name)]
    if unknown:
        if choice == "auto":
            return 0
        raise ValueError(
            f"{where}: --swin-attention fused needs transformers' SwinAttention with {', '.join(_NEEDED)}; "
            f"this transformers version lacks {', '.join(unknown)} (use --swin-attention transformers)"
        )
    for module in modules:
        module.forward = types.MethodType(fused_window_attention, module)
    return len(modules)


def uses_fused_window_attention(encoder: nn.Module) -> bool:
    return any("forward" in vars(m) for m in swin_attention_modules(encoder))
