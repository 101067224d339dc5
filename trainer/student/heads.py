"""Embedding predictor: a single-block Perceiver resampler over one LLM layer's hidden states.

One head per (task, layer). Keys/values are the hidden states of the tokens the caller allows
(padding and other tasks' task tokens masked) with the queries appended, as in Flamingo's
resampler; pre-LN cross-attention and feed-forward, each residual, then a projection to the
teacher's width. Design choice: queries are learnable, one per target token, for depth/seg-like
targets (T > 1), or given by the caller for gen-like ones (T == 1: the mean of the task's own
task-token states). Cost: T x width query parameters and T x (L + T) attention per sample
(`ola bench heads`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ResamplerHead(nn.Module):
    def __init__(
        self,
        *,
        llm_width: int,
        width: int,
        out_width: int,
        num_queries: int,
        learned_queries: bool,
        num_heads: int,
        ffn_mult: int,
    ) -> None:
        super().__init__()
        if width % num_heads:
            raise ValueError(f"head width {width} is not divisible by {num_heads} attention heads")
        self.num_heads = num_heads
        self.kv_norm = nn.LayerNorm(llm_width)
        self.kv_proj = nn.Linear(llm_width, width)
        # Learnable queries (depth/seg), or None: the caller passes query states (gen).
        self.queries = nn.Parameter(torch.randn(num_queries, width) * 0.02) if learned_queries else None
        self.q_norm = nn.LayerNorm(width)
        self.to_q = nn.Linear(width, width, bias=False)
        self.to_kv = nn.Linear(width, 2 * width, bias=False)
        self.to_out = nn.Linear(width, width, bias=False)
        self.ffn_norm = nn.LayerNorm(width)
        self.ffn = nn.Sequential(
            nn.Linear(width, ffn_mult * width), nn.GELU(), nn.Linear(ffn_mult * width, width)
        )
        self.out_norm = nn.LayerNorm(width)
        self.out_proj = nn.Linear(width, out_width)

    def forward(
        self,
        states: torch.Tensor,  # [B, L, D_llm]
        key_mask: torch.Tensor,  # [B, L] bool, True = attend
        query_states: torch.Tensor | None = None,  # [B, Tq, D_llm], only without learned queries
    ) -> torch.Tensor:  # [B, T, D_out]
        batch = states.shape[0]
        media = self.kv_proj(self.kv_norm(states))  # [B, L, W]
        if self.queries is not None:
            latents = self.queries.to(media.dtype).unsqueeze(0).expand(batch, -1, -1)  # [B, T, W]
        else:
            if query_states is None:
                raise ValueError("this head has no learned queries: pass query_states")
            latents = self.kv_proj(self.kv_norm(query_states))  # [B, 1, W]
        num_q = latents.shape[1]

        normed = self.q_norm(latents)  # [B, T, W]
        keys = torch.cat([media, normed], dim=1)  # [B, L + T, W]: queries appended to the keys
        mask = torch.cat([key_mask, key_mask.new_ones(batch, num_q)], dim=1)  # [B, L + T]

        q = self._split(self.to_q(normed))  # [B, H, T, W/H]
        k, v = (self._split(x) for x in self.to_kv(keys).chunk(2, dim=-1))  # [B, H, L + T, W/H]
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])  # [B, H, T, W/H]
        attn = attn.transpose(1, 2).reshape(batch, num_q, -1)  # [B, T, W]

        latents = latents + self.to_out(attn)
        latents = latents + self.ffn(self.ffn_norm(latents))
        return self.out_proj(self.out_norm(latents))  # [B, T, D_out]

    def _split(self, x: torch.Tensor) -> torch.Tensor:  # [B, N, W] -> [B, H, N, W/H]
        return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)
