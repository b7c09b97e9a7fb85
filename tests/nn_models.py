"""Models built only from torch.nn parts (no Hugging Face): nn.RMSNorm, nn.MultiheadAttention,
F.scaled_dot_product_attention. Unmodified, as a user would write them."""
import torch
import torch.nn as nn
import torch.nn.functional as F

VOCAB = 128


class SDPABlock(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.RMSNorm(width), nn.RMSNorm(width)
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.proj = nn.Linear(width, width, bias=False)
        self.up = nn.Linear(width, 4 * width)
        self.down = nn.Linear(4 * width, width)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(C, dim=-1)
        q, k, v = (z.view(B, T, self.heads, C // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class MHABlock(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.norm1, self.norm2 = nn.RMSNorm(width), nn.RMSNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True, bias=True)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(),
                                 nn.Linear(4 * width, width))

    def forward(self, x):
        h = self.norm1(x)
        T = x.shape[1]
        mask = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class ShapeOpsBlock(nn.Module):
    """Attention with complex-form rotary embeddings (view_as_complex / view_as_real /
    polar), L2-normalised per-head q/k (linalg.vector_norm), scores as an einsum over the
    heads, a gather along the keys, an in-place masked_fill_ with
    a mask taken expand_as the scores, shapes taken from other tensors (reshape_as,
    view_as, zeros_like) and a log-sigmoid-gated MLP."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.RMSNorm(width), nn.RMSNorm(width)
        self.q, self.k, self.v, self.o = (nn.Linear(width, width, bias=False) for _ in range(4))
        self.gate = nn.Linear(width, 2 * width, bias=False)
        self.up = nn.Linear(width, 2 * width, bias=False)
        self.down = nn.Linear(2 * width, width, bias=False)

    def forward(self, x):
        B, T, C = x.shape
        H, D = self.heads, C // self.heads
        h = self.norm1(x)
        q, k, v = (p(h).view(B, T, H, D) for p in (self.q, self.k, self.v))
        pos = torch.arange(T, device=x.device, dtype=torch.float32)
        inv = 1.0 / 10000 ** (torch.arange(0, D, 2, device=x.device).float() / D)
        freqs = torch.polar(torch.ones(T, D // 2, device=x.device), torch.outer(pos, inv))

        def rope(z):
            zc = torch.view_as_complex(z.float().reshape(B, T, H, D // 2, 2))
            return torch.view_as_real(zc * freqs[None, :, None, :]).flatten(3).type_as(z)

        q, k = (z / torch.linalg.vector_norm(z, dim=-1, keepdim=True).clamp_min(1e-6)
                for z in (rope(q), rope(k)))
        scores = torch.einsum("bthd,bshd->bhts", q, k) * D ** 0.5
        # each query also sees its score for the mirrored key (gather along the keys)
        mirror = torch.arange(T - 1, -1, -1, device=x.device).expand(B, H, T, T)
        scores = scores + 0.1 * scores.gather(-1, mirror)
        mask = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
        scores.masked_fill_(mask.expand_as(scores), float("-inf"))
        y = (scores.softmax(-1) @ v.transpose(1, 2)).transpose(1, 2).reshape_as(x)
        x = x + self.o(y)
        h = self.norm2(x)
        g, u = self.gate(h), self.up(h)
        acc = torch.zeros_like(u) + torch.exp(F.logsigmoid(g)) * g * u
        return x + self.down(acc.view_as(u))


class NormMixBlock(SDPABlock):
    """An extra square linear whose output is layer-normalised over all its features before
    anything else reads it: tensor parallelism cannot split it (the norm needs every
    feature), so it stays whole on every rank, and the user must be told."""

    def __init__(self, width, heads):
        super().__init__(width, heads)
        self.mix = nn.Linear(width, width, bias=False)
        self.mix_norm = nn.LayerNorm(width)

    def forward(self, x):
        x = super().forward(x)
        return x + self.mix_norm(self.mix(x))


class NoGradCycleBlock(SDPABlock):
    """HRM's cycles: the block first runs under torch.no_grad() (export keeps that region
    as one higher-order op), then again with gradients on the result."""

    def forward(self, x):
        with torch.no_grad():
            z = super().forward(x)
        return super().forward(x + 0.5 * z)


class HeadConvBlock(SDPABlock):
    """ZAYA's convolutional attention: separate q and k projections (2 key heads for 4
    query heads) concatenated on their channels and convolved causally per head (a
    grouped conv1d, one group per q or k head); the keys get the mean of the query heads
    that share them; the value is [v_current | v_delayed], one head each, the second the
    previous token's; q and k L2-normalised per head."""

    def __init__(self, width, heads, kv_heads=2):
        super().__init__(width, heads)
        del self.qkv
        self.kv, hd = kv_heads, width // heads
        self.q = nn.Linear(width, width, bias=False)
        self.k = nn.Linear(width, kv_heads * hd, bias=False)
        self.v_cur = nn.Linear(width, kv_heads * hd // 2, bias=False)
        self.v_del = nn.Linear(width, kv_heads * hd // 2, bias=False)
        qk = width + kv_heads * hd
        self.conv = nn.Conv1d(qk, qk, 3, groups=heads + kv_heads)

    def forward(self, x):
        B, T, C = x.shape
        H, hd = self.heads, C // self.heads
        h = self.norm1(x)
        q, k = self.q(h), self.k(h)
        qk = F.pad(torch.cat([q, k], dim=-1).transpose(1, 2), (2, 0))
        cq, ck = self.conv(qk).transpose(1, 2).split([C, self.kv * hd], dim=-1)
        q_res = q.view(B, T, H, hd)
        k_res = q_res.view(B, T, self.kv, H // self.kv, hd).mean(dim=-2)
        q = cq.view(B, T, H, hd) + q_res
        k = ck.view(B, T, self.kv, hd) + k_res
        q, k = (F.normalize(z, dim=-1) * hd ** 0.5 for z in (q, k))
        delayed = self.v_del(h)
        delayed = torch.cat([torch.zeros_like(delayed[:, :1]), delayed[:, :-1]], dim=1)
        v = torch.cat([self.v_cur(h), delayed], dim=-1).view(B, T, self.kv, hd)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class StateLoopBlock(SDPABlock):
    """xLSTM's step-by-step form: a per-head matrix state updated token by token, each
    step's read-out written into a buffer made by torch.zeros (split by heads like the
    states that fill it), joined by torch.concatenate and normalised per head with
    var(unbiased=False)."""

    def forward(self, x):
        B, T, C = x.shape
        H = self.heads
        hd = C // H
        q, k, v = (z.view(B, T, H, hd).transpose(1, 2)
                   for z in self.qkv(self.norm1(x)).split(C, dim=-1))
        state = torch.zeros(B, H, hd, hd, dtype=x.dtype)
        out = torch.zeros(B, H, T, hd, dtype=x.dtype)
        for t in range(T):
            state = 0.9 * state + k[:, :, t, :, None] * v[:, :, t, None, :]
            out[:, :, t] = (q[:, :, t, None, :] @ state).squeeze(2)
        y = torch.concatenate([out[..., :hd // 2], out[..., hd // 2:]], dim=-1)
        y = (y - y.mean(-1, keepdim=True)) / torch.sqrt(
            y.var(dim=-1, keepdim=True, unbiased=False) + 1e-5)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class RelBiasBlock(SDPABlock):
    """Inkling's attention bias: per-head relative states (a linear viewed as heads, a
    learned per-head scale, an L2 clip) times a bank of bias-vs-distance profiles shared
    by every head (a whole [d_rel, extent] weight), read backwards (flip) and gathered
    per query / key distance."""

    def __init__(self, width, heads, d_rel=8, extent=16):
        super().__init__(width, heads)
        self.extent = extent
        self.rel = nn.Linear(width, heads * d_rel, bias=False)
        self.rel_scale = nn.Parameter(torch.linspace(0.5, 1.5, heads * d_rel).view(heads, -1))
        self.bank = nn.Parameter(torch.randn(d_rel, extent) * 0.5)

    def forward(self, x):
        B, T, C = x.shape
        H = self.heads
        h = self.norm1(x)
        q, k, v = (z.view(B, T, H, -1).transpose(1, 2) for z in self.qkv(h).split(C, dim=-1))
        r = self.rel(h).view(B, T, H, -1) * self.rel_scale
        r = r / r.norm(dim=-1, keepdim=True).clamp_min(1.0)
        logits = (r @ self.bank).transpose(1, 2).flip(-1)      # [B, H, T, extent] reversed
        pos = torch.arange(T, device=x.device)
        dist = (pos[:, None] - pos[None, :]).clamp(0, self.extent - 1)
        bias = logits.gather(-1, (self.extent - 1 - dist).expand(B, H, T, T))
        bias = bias.masked_fill(pos[None, :] > pos[:, None], float("-inf"))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class DenseMoEBlock(SDPABlock):
    """Inkling's dense expert FFN: every expert runs on every token (torch.bmm over 3-D
    expert weights), the outputs mixed by the router's softmax. Expert tensor parallelism
    splits each expert's FFN; under SP the tokens are gathered for the experts."""

    def __init__(self, width, heads, experts=4):
        super().__init__(width, heads)
        del self.up, self.down            # the experts replace the dense FFN
        self.router = nn.Linear(width, experts, bias=False)
        self.w_in = nn.Parameter(torch.randn(experts, width, 2 * width) * width ** -0.5)
        self.w_out = nn.Parameter(torch.randn(experts, 2 * width, width) * width ** -0.5)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(C, dim=-1)
        q, k, v = (z.view(B, T, self.heads, -1).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
        h = self.norm2(x).reshape(B * T, C)
        gates = self.router(h).softmax(-1)                                   # [BT, E]
        tokens = h.unsqueeze(0).expand(self.w_in.shape[0], -1, -1)           # [E, BT, C]
        out = torch.bmm(F.silu(torch.bmm(tokens, self.w_in)), self.w_out)   # [E, BT, C]
        return x + (out * gates.t().unsqueeze(-1)).sum(0).view(B, T, C)


class NormedKeyBlock(SDPABlock):
    """xLSTM's keys: a projection L2-normalised over its whole width before it is cut into
    heads (kept whole: the norm mixes every head), read by head-split queries and values
    in an explicit attention; under SP its sequence shard is gathered there."""

    def __init__(self, width, heads):
        super().__init__(width, heads)
        del self.qkv
        self.qv = nn.Linear(width, 2 * width, bias=False)
        self.k = nn.Linear(width, width, bias=False)

    def forward(self, x):
        B, T, C = x.shape
        h = self.norm1(x)
        q, v = self.qv(h).split(C, dim=-1)
        k = F.normalize(self.k(h), dim=-1) * C ** 0.5
        q, k, v = (z.view(B, T, self.heads, -1).transpose(1, 2) for z in (q, k, v))
        s = (q @ k.transpose(-1, -2)) * (C // self.heads) ** -0.5
        s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        y = s.softmax(-1) @ v
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class DeltaMixBlock(SDPABlock):
    """Attention, then a gated linear-attention mixer (a simplified gated delta net, as in
    Qwen3-Next / Qwen3.5): a fused [q | k | v] projection whose value part is wider than
    its key parts (unequal pieces), a depthwise causal conv1d over all of it, split back;
    key heads L2-normalised and repeated for the value heads that share them; causal
    linear attention over the sequence padded by a chunk (scores masked by tril); an
    output gate from a separate projection; the down-projection. tp splits every piece by
    heads, the conv filters along with them."""

    def __init__(self, width, heads, key_heads=2, value_heads=4, head_dim=8):
        super().__init__(width, heads)
        self.kh, self.vh, self.hd = key_heads, value_heads, head_dim
        fused = (2 * key_heads + value_heads) * head_dim
        self.norm3 = nn.RMSNorm(width)
        self.fused = nn.Linear(width, fused, bias=False)
        self.conv = nn.Conv1d(fused, fused, 4, groups=fused, bias=False, padding=3)
        self.z = nn.Linear(width, value_heads * head_dim, bias=False)
        self.out = nn.Linear(value_heads * head_dim, width, bias=False)

    def forward(self, x):
        x = super().forward(x)
        B, T, _ = x.shape
        h = self.norm3(x)
        mixed = F.silu(self.conv(self.fused(h).transpose(1, 2))[..., :T]).transpose(1, 2)
        kd = self.kh * self.hd
        q, k, v = torch.split(mixed, [kd, kd, self.vh * self.hd], dim=-1)
        q, k = (F.normalize(a.reshape(B, T, self.kh, self.hd), dim=-1)
                .repeat_interleave(self.vh // self.kh, dim=2) for a in (q, k))
        v = v.reshape(B, T, self.vh, self.hd)
        q, k, v = (F.pad(a.transpose(1, 2), (0, 0, 0, 4)) for a in (q, k, v))
        y = ((q @ k.transpose(-1, -2)).tril() @ v)[:, :, :T]          # [B, H, T, D]
        y = y.transpose(1, 2).reshape(B, T, -1) * F.silu(self.z(h))
        return x + self.out(y)


class SSDMixBlock(SDPABlock):
    """Attention, then a Mamba-2-style mixer: one fused in_proj [z | x | B | C | dt], a
    depthwise conv over [x | B | C], a per-head state-space recurrence over time (in
    its quadratic chunk form) with B and C in one group shared by every head, a gated RMSNorm over all inner features (one
    group), the out-projection. tp splits z, x and dt by heads and keeps B and C whole on
    every rank (one group < tp), their conv filters too; the norm's statistic is summed
    over tp."""

    def __init__(self, width, heads, ssm_heads=4, head_dim=8, state=4):
        super().__init__(width, heads)
        self.h, self.hd, self.n = ssm_heads, head_dim, state
        inner = ssm_heads * head_dim
        self.norm3 = nn.RMSNorm(width)
        self.in_proj = nn.Linear(width, 2 * inner + 2 * state + ssm_heads, bias=False)
        self.conv = nn.Conv1d(inner + 2 * state, inner + 2 * state, 4,
                              groups=inner + 2 * state, padding=3)
        self.a_log = nn.Parameter(torch.linspace(-1.0, 0.5, ssm_heads))
        self.dt_bias = nn.Parameter(torch.linspace(-0.5, 0.5, ssm_heads))
        self.gnorm = nn.Parameter(torch.linspace(0.5, 1.5, inner))
        self.out = nn.Linear(inner, width, bias=False)

    def forward(self, x):
        x = super().forward(x)
        B, T, _ = x.shape
        inner = self.h * self.hd
        z, xbc, dt = torch.split(self.in_proj(self.norm3(x)),
                                 [inner, inner + 2 * self.n, self.h], dim=-1)
        xbc = F.silu(self.conv(xbc.transpose(1, 2))[..., :T]).transpose(1, 2)
        u, b, c = torch.split(xbc, [inner, self.n, self.n], dim=-1)
        u = u.view(B, T, self.h, self.hd)
        b, c = b.view(B, T, 1, self.n), c.view(B, T, 1, self.n)   # one group for all heads
        dt = F.softplus(dt + self.dt_bias)                          # [B, T, heads]
        # the recurrence h_t = exp(-exp(a) dt_t) h_{t-1} + dt_t u_t b_t, y_t = h_t c_t in
        # its quadratic (chunk) form, as Mamba-2's scan computes a chunk
        decay = torch.cumsum(-torch.exp(self.a_log) * dt, dim=1)    # log decay to t
        seg = decay[:, :, None, :] - decay[:, None, :, :]            # [B, T, S, heads]
        causal = torch.ones(T, T, dtype=torch.bool).tril()[None, :, :, None]
        w = torch.exp(seg.masked_fill(~causal, float("-inf")))
        cb = (c[:, :, None, 0, :] * b[:, None, :, 0, :]).sum(-1)     # [B, T, S]
        y = torch.einsum("btsh,bshd->bthd", w * cb[..., None] * dt[:, None], u)
        y = y.reshape(B, T, inner) * F.silu(z)
        g = y.view(B, T, 1, inner)
        g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + 1e-6)
        return x + self.out(self.gnorm * g.view(B, T, inner))


class ScanMixBlock(SDPABlock):
    """Attention, then a Mamba-1-style selective scan: in_proj [x | z], a depthwise conv,
    x_proj to (dt, B, C) shared by all channels, dt_proj applied as ``W @ dt`` (as
    Hugging Face's Mamba does), a recurrence over time whose state's rows are channels,
    the out-projection. tp splits the channels (the fused [x | z] rows in two blocks; the
    conv filters and skip d are read only by their channels, so stored split): x_proj is
    row-parallel and its all-reduced output flows back into the same block's scan
    (all-reduced even under SP)."""

    def __init__(self, width, heads, inner=64, rank=4, state=4):
        super().__init__(width, heads)
        self.rank, self.n = rank, state
        self.norm3 = nn.RMSNorm(width)
        self.in_proj = nn.Linear(width, 2 * inner, bias=False)
        self.conv = nn.Conv1d(inner, inner, 3, groups=inner, padding=2)
        self.x_proj = nn.Linear(inner, rank + 2 * state, bias=False)
        self.dt_proj = nn.Linear(rank, inner)
        self.a_log = nn.Parameter(torch.log(torch.arange(1.0, state + 1)).repeat(inner, 1))
        self.d = nn.Parameter(torch.linspace(0.5, 1.5, inner))
        self.out = nn.Linear(inner, width, bias=False)

    def forward(self, x):
        x = super().forward(x)
        B, T, _ = x.shape
        u, z = self.in_proj(self.norm3(x)).chunk(2, dim=-1)
        u = F.silu(self.conv(u.transpose(1, 2))[..., :T])                 # [B, C, T]
        dt, b, c = torch.split(self.x_proj(u.transpose(1, 2)), [self.rank, self.n, self.n],
                               dim=-1)
        dt = F.softplus(self.dt_proj.weight @ dt.transpose(1, 2) + self.dt_proj.bias[:, None])
        a = -torch.exp(self.a_log)                                        # [C, N]
        state, ys = u.new_zeros(B, u.shape[1], self.n), []
        for t in range(T):
            state = torch.exp(a * dt[:, :, t, None]) * state + \
                dt[:, :, t, None] * b[:, None, t, :] * u[:, :, t, None]
            ys.append(torch.matmul(state, c[:, t, :, None])[..., 0])
        y = torch.stack(ys, -1) + u * self.d[:, None]
        return x + self.out((y * F.silu(z.transpose(1, 2))).transpose(1, 2))


class OddsBlock(nn.Module):
    """Projections that are not plain nn.Linear pairs: a low-rank query (down-projection,
    RMSNorm, up-projection, as MLA's q_a / q_b: the down-projection split, its output
    gathered); keys and values as einsums with 3-D [width, heads, head_dim] weights and
    the out-projection back (XLNet); a norm of the attention output before it (BitNet's
    sub-norm: its statistic summed over tp); an FFN whose output a sigmoid of another
    projection gates (RWKV's receptance: split, the FFN's partial sums reduce-scattered
    over the features, the product gathered)."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads, hd = heads, width // heads
        self.norm1, self.norm2 = nn.RMSNorm(width), nn.RMSNorm(width)
        self.q_a = nn.Linear(width, width // 2, bias=False)
        self.q_norm = nn.RMSNorm(width // 2)
        self.q_b = nn.Linear(width // 2, width, bias=False)
        self.k, self.v, self.o = (nn.Parameter(torch.randn(width, heads, hd) * width ** -0.5)
                                  for _ in range(3))
        self.sub_w = nn.Parameter(torch.linspace(0.5, 1.5, width))
        self.key = nn.Linear(width, 2 * width, bias=False)
        self.value = nn.Linear(2 * width, width, bias=False)
        self.receptance = nn.Linear(width, width, bias=False)

    def forward(self, x):
        B, T, C = x.shape
        h = self.norm1(x)
        q = self.q_b(self.q_norm(self.q_a(h))).view(B, T, self.heads, -1)
        k = torch.einsum("bsh,hnd->bsnd", h, self.k)
        v = torch.einsum("bsh,hnd->bsnd", h, self.v)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                           v.transpose(1, 2), is_causal=True)
        a = a.transpose(1, 2).reshape(B, T, C)
        a = a * torch.rsqrt(a.pow(2).mean(-1, keepdim=True) + 1e-6) * self.sub_w
        x = x + torch.einsum("bsnd,hnd->bsh", a.view(B, T, self.heads, -1), self.o)
        h = self.norm2(x)
        return x + torch.sigmoid(self.receptance(h)) * self.value(torch.relu(self.key(h)) ** 2)


def _interleaved_rope(x, pos):
    """Rotary embedding on adjacent pairs of the last dimension (GPT-J / DeepSeek-V4)."""
    r = x.shape[-1]
    angle = pos[:, None] * (1.0 / 10000 ** (torch.arange(0, r, 2, dtype=x.dtype) / r))
    cos, sin = angle.cos().repeat_interleave(2, -1), angle.sin().repeat_interleave(2, -1)
    rotated = torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)
    return x * cos + rotated * sin


class SinkMixBlock(nn.Module):
    """DeepSeek-V4 / HY-V4 attention: a low-rank query; keys and values up-projected per
    head from a latent, the key assembled in fresh storage from its per-head part and a
    rotary part one projection shares with every head (new_empty + copy_); interleaved
    rotary (stack); per-head attention sinks in an eager softmax; a grouped output
    projection (a [groups * rank, per-group] weight read as [groups, per-group, rank] by
    bmm) and a linear mixing the groups."""

    def __init__(self, width, heads, groups=2):
        super().__init__()
        self.heads, self.groups, hd = heads, groups, width // heads
        self.hd, self.rope, rank = hd, hd // 2, width // 4
        self.norm1, self.norm2 = nn.RMSNorm(width), nn.RMSNorm(width)
        self.q_a = nn.Linear(width, width // 2, bias=False)
        self.q_norm = nn.RMSNorm(width // 2)
        self.q_b = nn.Linear(width // 2, width, bias=False)
        self.kv_a = nn.Linear(width, width // 2 + self.rope, bias=False)
        self.kv_norm = nn.RMSNorm(width // 2)
        self.kv_b = nn.Linear(width // 2, heads * (2 * hd - self.rope), bias=False)
        self.sinks = nn.Parameter(torch.linspace(-1.0, 1.0, heads))
        self.o_a = nn.Parameter(torch.randn(groups * rank, width // groups) * width ** -0.5)
        self.o_b = nn.Linear(groups * rank, width, bias=False)
        self.up, self.down = nn.Linear(width, 2 * width), nn.Linear(2 * width, width)

    def forward(self, x):
        B, T, C = x.shape
        H, hd, r = self.heads, self.hd, self.rope
        pos = torch.arange(T, dtype=x.dtype, device=x.device)
        h = self.norm1(x)
        q = self.q_b(self.q_norm(self.q_a(h))).view(B, T, H, hd).transpose(1, 2)
        q = torch.cat([q[..., :hd - r], _interleaved_rope(q[..., hd - r:], pos)], dim=-1)
        latent, k_rot = self.kv_a(h).split([C // 2, r], dim=-1)
        kv = self.kv_b(self.kv_norm(latent)).view(B, T, H, -1).transpose(1, 2)
        k_nope, v = kv.split([hd - r, hd], dim=-1)
        k_rot = _interleaved_rope(k_rot.view(B, 1, T, r), pos)
        key = kv.new_empty(B, H, T, hd)
        key[..., :hd - r].copy_(k_nope)
        key[..., hd - r:].copy_(k_rot.expand(-1, H, -1, -1))
        logits = q @ key.transpose(-1, -2) * hd ** -0.5
        logits = logits.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), -1e9)
        logits = torch.cat([logits, self.sinks.view(1, H, 1, 1).expand(B, H, T, 1)], dim=-1)
        probs = (logits - logits.max(dim=-1, keepdim=True).values).softmax(-1)[..., :-1]
        a = (probs @ v).transpose(1, 2).reshape(B * T, self.groups, -1).transpose(0, 1)
        w = self.o_a.view(self.groups, -1, C // self.groups).transpose(1, 2)
        y = torch.bmm(a, w).transpose(0, 1).reshape(B, T, -1)
        x = x + self.o_b(y)
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class TorchNNLM(nn.Module):
    """Token embedding, blocks, RMSNorm, tied LM head; returns the mean cross-entropy.
    ``glyph``: RoCBert's input layer, a second table of ids derived from the tokens (61
    rows: padded to split) concatenated with the token embedding and mapped back to the
    width by a linear, before SDPA blocks."""

    def __init__(self, block="sdpa", width=32, heads=4, depth=2):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, width)
        if block == "glyph":
            self.glyph = nn.Embedding(61, width // 2)
            self.map = nn.Linear(width + width // 2, width)
            block = "sdpa"
        cls = {"sdpa": SDPABlock, "mha": MHABlock, "shape_ops": ShapeOpsBlock,
               "norm_mix": NormMixBlock, "delta_mix": DeltaMixBlock, "ssd_mix": SSDMixBlock,
               "scan_mix": ScanMixBlock, "odds": OddsBlock, "sink_mix": SinkMixBlock,
               "no_grad": NoGradCycleBlock, "head_conv": HeadConvBlock,
               "state_loop": StateLoopBlock, "rel_bias": RelBiasBlock,
               "dense_moe": DenseMoEBlock, "normed_key": NormedKeyBlock}[block]
        self.blocks = nn.ModuleList(cls(width, heads) for _ in range(depth))
        self.norm = nn.RMSNorm(width)
        self.head = nn.Linear(width, VOCAB, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, input_ids, labels):
        x = self.emb(input_ids)
        if hasattr(self, "glyph"):
            x = self.map(torch.cat([x, self.glyph(input_ids % 61)], dim=-1))
        for b in self.blocks:
            x = b(x)
        logits = self.head(self.norm(x))
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
