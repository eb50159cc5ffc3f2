"""The CPU fast path of the modulated deformable convolution: gathers, GEMMs, a hand-written backward.

Why not torchvision's CPU kernel: it is ~50-75x slower than a plain conv (forward + backward) at the search's proxy
shape. Why not ``grid_sample``: it samples every channel separately, its backward scatters one scalar at a time,
and the mask multiply, the layout changes and the matmul each make more passes over the large sampled columns.

How this path works, per chunk of output pixels (temporaries stay in cache; memory is bounded at any batch):

1. The input is copied once into a zero-padded, channels-last *table*, one row per (image, deformable group,
   padded pixel) holding that group's ``Cg`` channels: ``[N * dg * (H+2) * (W+2), Cg]``. The one-pixel zero border
   makes every bilinear corner of an in-image sample a valid row (corners outside the image read zeros), so no
   per-corner test is needed; samples wholly outside (``y <= -1``, ``y >= H``, ...) get zero weights.
2. For each *bag* = (pixel, group, tap): the top-left corner row and the four bilinear weights with the mask
   folded in, computed once (not per channel). ``F.embedding_bag(mode="sum", per_sample_weights=...)`` then writes
   the sampled, interpolated, masked columns in one pass, directly in the ``[pixels, dg * k*k * Cg]`` layout that
   one GEMM with the (permuted) weight consumes.
3. Backward recomputes the indices, weights and columns (unless the columns were kept) and computes
   - the weight gradient: one GEMM (columns^T @ grad_out); the column gradient: one GEMM (grad_out @ weight^T);
   - offset and mask gradients: per bag and corner, the dot product of the column gradient with the corner's
     row (a sampled dense-dense matmul: ``torch.sparse.sampled_addmm``, no corner tensor materialised), then
     closed-form ``lerp``s of the bilinear coefficients;
   - the input gradient, a scatter: sorting the bags by top-left row turns it into a gather (``embedding_bag``
     with offsets over the sorted bags) for each of the 4 corners, added at 4 constant row shifts.
4. The chunks are shared among worker threads that each run torch on one intra-op thread (see :func:`_run`).

docs/deform.md has the measurements behind each choice.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

T = TypeVar("T")

# Bytes of sampled columns processed at once (per chunk). Small enough to stay in the last-level cache; large
# enough that the GEMMs and kernel launches are efficient. See docs/deform.md.
DEFAULT_CHUNK_BYTES = 8 * 2**20
# Keep the forward's columns for the backward when all of them fit in this many bytes (saves one gather).
DEFAULT_SAVE_BYTES = 0


@dataclass(frozen=True)
class Geometry:
    """Shapes and hyper-parameters of one deformable convolution call."""

    n: int
    cin: int
    h: int
    w: int
    cout: int
    kh: int
    kw: int
    sh: int
    sw: int
    ph: int
    pw: int
    dh: int
    dw: int
    dg: int
    groups: int
    ho: int
    wo: int

    @property
    def cg(self) -> int:
        return self.cin // self.dg

    @property
    def k2(self) -> int:
        return self.kh * self.kw

    @property
    def hp(self) -> int:
        return self.h + 2

    @property
    def wp(self) -> int:
        return self.w + 2

    @property
    def pixels(self) -> int:
        return self.n * self.ho * self.wo

    @property
    def k(self) -> int:
        """Columns per output pixel: dg * k*k * Cg (ordered group, tap, channel)."""
        return self.dg * self.k2 * self.cg


class _Plan:
    """Constants of one geometry: per-image base sampling positions, group rows, corner shifts, bag offsets.

    Small (about Ho*Wo*k*k values) and cached across calls: the search repeats the same shapes every step.
    """

    def __init__(self, geo: Geometry, dtype: torch.dtype, device: torch.device, max_bags: int) -> None:
        self.geo = geo
        oy = torch.arange(geo.ho, device=device, dtype=dtype) * geo.sh - geo.ph
        ox = torch.arange(geo.wo, device=device, dtype=dtype) * geo.sw - geo.pw
        ky = torch.arange(geo.kh, device=device, dtype=dtype) * geo.dh
        kx = torch.arange(geo.kw, device=device, dtype=dtype) * geo.dw
        shape = (geo.ho, geo.wo, geo.kh, geo.kw)
        # [Ho*Wo, k2]: where each tap of each output pixel samples before its offset.
        self.base_y = (oy[:, None, None, None] + ky[None, None, :, None]).expand(shape).reshape(-1, geo.k2)
        self.base_x = (ox[None, :, None, None] + kx[None, None, None, :]).expand(shape).reshape(-1, geo.k2)
        self.group_rows = torch.arange(geo.dg, device=device)[None, :, None] * (geo.hp * geo.wp)
        self.corner_shift = torch.tensor([0, 1, geo.wp, geo.wp + 1], device=device)
        self.shifts = (0, 1, geo.wp, geo.wp + 1)
        # "4 entries per bag": embedding_bag offsets, and the sparsity pattern of the corner dot products.
        self.bag_offsets = torch.arange(0, 4 * max_bags + 1, 4, device=device)
        self.ones = torch.ones(4 * max_bags, device=device, dtype=dtype)


_PLANS: OrderedDict[tuple, _Plan] = OrderedDict()
_PLANS_LOCK = threading.Lock()


def _plan(geo: Geometry, dtype: torch.dtype, device: torch.device, max_bags: int) -> _Plan:
    """The cached :class:`_Plan` (a few recent geometries are kept)."""
    key = (geo, dtype, device, max_bags)
    with _PLANS_LOCK:
        plan = _PLANS.get(key)
        if plan is None:
            plan = _PLANS[key] = _Plan(geo, dtype, device, max_bags)
            while len(_PLANS) > 32:
                _PLANS.popitem(last=False)
        else:
            _PLANS.move_to_end(key)
        return plan


@dataclass
class _Samples:
    """Corner rows and bilinear coefficients of one chunk's bags, each shaped [P, dg, k2]."""

    rows: Tensor  # int64: table row of the top-left corner
    ly: Tensor  # fractional parts of the sampling position
    lx: Tensor
    inside: Tensor  # 1.0 where torchvision samples the image (-1 < y < H and -1 < x < W), else 0.0
    mask: Tensor | None

    def corners(self, plan: _Plan) -> Tensor:
        """[bags * 4] rows of the four corners of every bag (top-left, top-right, bottom-left, bottom-right)."""
        return (self.rows[..., None] + plan.corner_shift).view(-1)

    def corner_weights(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Bilinear weights of the four corners times the mask, zero outside the image: 4 x [P, dg, k2]."""
        vert = self.inside if self.mask is None else self.inside * self.mask
        bottom = vert * self.ly
        top = vert - bottom
        top_right = top * self.lx
        bottom_right = bottom * self.lx
        return top - top_right, top_right, bottom - bottom_right, bottom_right

    def coordinate_grads(self, dots: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Grads of (mask, y, x) from ``dots[..., c] = <column grad, corner c's row>``.

        With corner values v00, v01, v10, v11 the sample is lerp(lerp(v00, v01, lx), lerp(v10, v11, lx), ly)
        times the mask, so d/dmask = that lerp, d/dy = mask * lerp(v10 - v00, v11 - v01, lx) and
        d/dx = mask * lerp(v01 - v00, v11 - v10, ly); all zero outside the image.
        """
        d00, d01, d10, d11 = dots.view(*self.rows.shape, 4).unbind(-1)
        top = torch.lerp(d00, d01, self.lx)
        bottom = torch.lerp(d10, d11, self.lx)
        g_mask = torch.lerp(top, bottom, self.ly) * self.inside
        scale = self.inside if self.mask is None else self.inside * self.mask
        g_y = torch.lerp(d10 - d00, d11 - d01, self.lx) * scale
        g_x = torch.lerp(d01 - d00, d11 - d10, self.ly) * scale
        return g_mask, g_y, g_x


def _samples(plan: _Plan, offset: Tensor, mask: Tensor | None, start: int, stop: int) -> _Samples:
    """Sampling positions of output pixels ``start:stop`` (flattened over N, Ho, Wo), all groups and taps.

    ``offset``: those pixels' offsets, pixel-major [P, dg*k2*2] (torchvision's channel order: (dy, dx) per group
    and tap); ``mask``: [P, dg*k2] or ``None``.
    """
    geo = plan.geo
    hw = geo.ho * geo.wo
    pix = torch.arange(start, stop, device=offset.device)
    img = torch.div(pix, hw, rounding_mode="floor")
    local = pix - img * hw
    off = offset.view(-1, geo.dg, geo.k2, 2)
    base_y = plan.base_y.index_select(0, local)[:, None, :]
    base_x = plan.base_x.index_select(0, local)[:, None, :]
    y = base_y + off[..., 0]
    x = base_x + off[..., 1]
    y0 = torch.floor(y)
    x0 = torch.floor(x)
    inside_b = (y > -1) & (y < geo.h) & (x > -1) & (x < geo.w)  # torchvision's test (False for NaN too)
    ly = y.sub_(y0)
    lx = x.sub_(x0)
    # Top-left corner in padded coordinates. Every in-image sample has y0 in [-1, H-1] (padded row 0..H), so all
    # four corner rows exist. Samples outside (zero weights) and non-finite ones point at their tap's undeformed
    # position instead, clamped into the image: a valid row near the chunk's other rows, which keeps the
    # input-gradient scatter's row range (and its cost) about the chunk's size.
    yi = torch.where(inside_b, y0, base_y.clamp(-1, geo.h - 1)).to(torch.int64)
    xi = torch.where(inside_b, x0, base_x.clamp(-1, geo.w - 1)).to(torch.int64)
    row_base = (img * (geo.dg * geo.hp * geo.wp) + (geo.wp + 1))[:, None, None] + plan.group_rows
    rows = row_base + (yi * geo.wp + xi)
    inside = inside_b.to(ly.dtype)
    mask = None if mask is None else mask.view(-1, geo.dg, geo.k2)
    return _Samples(rows, ly, lx, inside, mask)


def _gather(table: Tensor, corners: Tensor, weights: Tensor, plan: _Plan) -> Tensor:
    """Sampled, interpolated, masked columns [bags, Cg]: one weighted sum of 4 table rows per bag.

    ``corners`` and ``weights`` are flat [bags * 4] (bag-major); ``include_last_offset`` with precomputed offsets
    is embedding_bag's fastest form.
    """
    offsets = plan.bag_offsets[: corners.numel() // 4 + 1]
    return F.embedding_bag(
        corners, table, offsets, per_sample_weights=weights, mode="sum", include_last_offset=True
    )


def _corner_dots(table: Tensor, gcol: Tensor, corners: Tensor, plan: _Plan) -> Tensor:
    """``<gcol[bag], table[corner row]>`` for every bag and corner: [bags * 4].

    A sampled dense-dense matmul (gcol @ table^T, evaluated only at the 4 corner entries of each bag), which
    ``torch.sparse.sampled_addmm`` computes without materialising the corner rows.
    """
    n = corners.numel() // 4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        pattern = torch.sparse_csr_tensor(
            plan.bag_offsets[: n + 1], corners, plan.ones[: 4 * n], (n, table.shape[0]), check_invariants=False
        )
        return torch.sparse.sampled_addmm(pattern, gcol, table.t(), beta=0.0).values()


def _narrow_ints(keys: Tensor, bound: int) -> Tensor:
    """Keys in ``[0, bound)`` as the narrowest integer type: sorting int16/int32 is faster than int64."""
    if bound <= 2**15:
        return keys.to(torch.int16)
    if bound <= 2**31:
        return keys.to(torch.int32)
    return keys


def _scatter(
    grad_table: Tensor, base_row: int, gcol: Tensor, rows: Tensor, weights: tuple[Tensor, ...], plan: _Plan
) -> None:
    """``grad_table[corner row - base_row] += weight * gcol[bag]`` for every bag and corner, without a row scatter.

    Sort the bags by top-left row (``rows``: [P, dg, k2]); the bags that touch a target row through corner c are
    then one contiguous run, so ``embedding_bag`` (a gather) sums them. Corner c lands ``shift[c]`` rows after the
    top-left row, so the four results are added at four constant offsets. Keys are made compact per deformable
    group first (each group's rows live in its own plane of the table) so the gathered range stays about the
    chunk's size.
    """
    dg = plan.geo.dg
    lo = rows.amin(dim=(0, 2))  # [dg]
    hi = rows.amax(dim=(0, 2))
    first = (lo - base_row).tolist()
    lengths = (hi - lo + 1).tolist()
    span = max(lengths)
    keys = (rows - (lo - torch.arange(dg, device=rows.device) * span)[None, :, None]).view(-1)
    order = _narrow_ints(keys, dg * span).sort().indices
    counts = torch.bincount(keys, minlength=dg * span)
    starts = torch.cumsum(counts, 0).sub_(counts)
    n = order.numel()
    # One gather for the four corners: bags [corner, group, row], each corner's weights in sorted order.
    offsets = torch.cat(
        ((starts + torch.arange(0, 4 * n, n, device=rows.device)[:, None]).view(-1), starts.new_tensor([4 * n]))
    )
    per = torch.stack(weights).view(4, -1).index_select(1, order).view(-1)
    acc = F.embedding_bag(
        order.repeat(4), gcol, offsets, per_sample_weights=per, mode="sum", include_last_offset=True
    ).view(4, dg, span, -1)
    for c, shift in enumerate(plan.shifts):
        for g in range(dg):
            begin = first[g] + shift
            grad_table[begin : begin + lengths[g]].add_(acc[c, g, : lengths[g]])


def _to_table(input: Tensor, geo: Geometry) -> Tensor:
    """[N, C, H, W] -> zero-padded channels-last rows [N * dg * (H+2) * (W+2), Cg] (one strided copy)."""
    table = input.new_empty(geo.n, geo.dg, geo.hp, geo.wp, geo.cg)
    table[:, :, :: geo.hp - 1].zero_()  # first and last padded rows
    table[:, :, :, :: geo.wp - 1].zero_()  # first and last padded columns
    table[:, :, 1:-1, 1:-1].copy_(input.reshape(geo.n, geo.dg, geo.cg, geo.h, geo.w).permute(0, 1, 3, 4, 2))
    return table.view(-1, geo.cg)


def _from_table(grad_table: Tensor, geo: Geometry) -> Tensor:
    """Inverse of :func:`_to_table` for the gradient: the interior back to [N, C, H, W] (one strided copy)."""
    interior = grad_table.view(geo.n, geo.dg, geo.hp, geo.wp, geo.cg)[:, :, 1:-1, 1:-1]
    return interior.permute(0, 1, 4, 2, 3).reshape(geo.n, geo.cin, geo.h, geo.w)


def _weight_matrix(weight: Tensor, geo: Geometry) -> Tensor:
    """[Cout, Cin/groups, kh, kw] -> [dg * k2 * Cg, Cout] in the column order (group, tap, channel).

    Grouped convolutions are expressed as a dense matrix with zeros outside each group's block.
    """
    if geo.groups > 1:
        cin_g = geo.cin // geo.groups
        cout_g = geo.cout // geo.groups
        dense = weight.new_zeros(geo.cout, geo.cin, geo.kh, geo.kw)
        for j in range(geo.groups):
            dense[j * cout_g : (j + 1) * cout_g, j * cin_g : (j + 1) * cin_g] = weight[j * cout_g : (j + 1) * cout_g]
        weight = dense
    w = weight.reshape(geo.cout, geo.dg, geo.cg, geo.k2).permute(1, 3, 2, 0)
    return w.reshape(geo.k, geo.cout)


def _weight_grad(grad_wm: Tensor, geo: Geometry) -> Tensor:
    """Inverse of :func:`_weight_matrix` for the gradient (keeping only each group's block)."""
    g = grad_wm.view(geo.dg, geo.k2, geo.cg, geo.cout).permute(3, 0, 2, 1).reshape(geo.cout, geo.cin, geo.kh, geo.kw)
    if geo.groups > 1:
        cin_g = geo.cin // geo.groups
        cout_g = geo.cout // geo.groups
        g = torch.cat(
            [g[j * cout_g : (j + 1) * cout_g, j * cin_g : (j + 1) * cin_g] for j in range(geo.groups)], dim=0
        )
    return g.contiguous()


def chunk_pixels(geo: Geometry, element_size: int, chunk_bytes: int) -> int:
    """Output pixels per chunk so that one chunk's columns take about ``chunk_bytes``."""
    return max(1, min(geo.pixels, chunk_bytes // (geo.k * element_size)))


@dataclass(frozen=True)
class _Chunk:
    """Output pixels ``p0:p1`` of images ``n0:n1``: either whole images, or a run of pixels of one image."""

    n0: int
    n1: int
    p0: int
    p1: int

    def flat(self, hw: int) -> tuple[int, int]:
        """The chunk as a range of pixels flattened over (N, Ho, Wo)."""
        return self.n0 * hw + self.p0, (self.n1 - 1) * hw + self.p1


def _chunks(geo: Geometry, step: int) -> list[_Chunk]:
    """Chunks of about ``step`` output pixels that never cut an image except into runs of one image's pixels.

    That shape lets every per-chunk layout change (NCHW <-> pixel-major) be a small strided copy of the chunk.
    """
    hw = geo.ho * geo.wo
    if step >= hw:
        per = step // hw
        return [_Chunk(n, min(n + per, geo.n), 0, hw) for n in range(0, geo.n, per)]
    return [_Chunk(n, n + 1, p, min(p + step, hw)) for n in range(geo.n) for p in range(0, hw, step)]


def _split(chunks: list[_Chunk], geo: Geometry, workers: int) -> list[list[_Chunk]]:
    """Contiguous runs of chunks, one per worker, of about equal pixels, cut at image boundaries if possible.

    Cutting at image boundaries gives each worker its own images, hence its own input-gradient rows.
    """
    workers = max(1, min(workers, len(chunks)))
    sizes = [(c.n1 - c.n0) * (c.p1 - c.p0) for c in chunks]
    total = sum(sizes)
    image_cuts = geo.n >= workers
    groups: list[list[_Chunk]] = [[]]
    done = 0
    for chunk, size in zip(chunks, sizes):
        target = total * len(groups) / workers
        at_image = chunk.p0 == 0
        if groups[-1] and len(groups) < workers and done + size / 2 > target and (at_image or not image_cuts):
            groups.append([])
        groups[-1].append(chunk)
        done += size
    return groups


def _images(group: list[_Chunk]) -> tuple[int, int]:
    return group[0].n0, group[-1].n1


_POOL: ThreadPoolExecutor | None = None


def _forget_pool() -> None:
    """A forked child inherits the pool object but not its threads: start a new one there."""
    global _POOL
    _POOL = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def _run(work: Callable[[int], T], jobs: int) -> list[T]:
    """Run ``work(0) ... work(jobs - 1)``: inline for one job, else one job per worker thread.

    Why threads of our own rather than torch's intra-op threads: the per-chunk work is dozens of small ops. Split
    over OpenMP threads, every op ends in a barrier, and on a busy 2-core machine (other processes running) each
    barrier waits for a descheduled thread: the 2-thread op ran 5-10x slower than the 1-thread one. Independent
    workers, each running its chunks on one intra-op thread, have no barriers at all. torch's thread count is set
    to 1 for the duration (it is process-wide) and restored afterwards.
    """
    if jobs == 1:
        return [work(0)]
    global _POOL
    if _POOL is None or _POOL._max_workers < jobs:  # noqa: SLF001 - resize the private pool
        _POOL = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="nasfcos-deform")
    threads = torch.get_num_threads()
    inference = torch.is_inference_mode_enabled()  # thread-local too: tensors made in it need it in the worker

    def single_threaded(job: int) -> T:
        torch.set_num_threads(1)
        # grad mode is thread-local; the caller's (forward/backward) is off
        with torch.inference_mode(inference), torch.no_grad():
            return work(job)

    torch.set_num_threads(1)
    try:
        futures = [_POOL.submit(single_threaded, job) for job in range(jobs)]
        return [f.result() for f in futures]
    finally:
        torch.set_num_threads(threads)


def _workers(device: torch.device) -> int:
    """Worker threads for the chunk loop: torch's intra-op thread count on the CPU, one elsewhere."""
    return torch.get_num_threads() if device.type == "cpu" else 1


def _take(t3: Tensor | None, c: _Chunk) -> Tensor | None:
    """[N, C, Ho*Wo] -> the chunk's [P, C] (pixel-major; a small strided copy)."""
    if t3 is None:
        return None
    return t3[c.n0 : c.n1, :, c.p0 : c.p1].transpose(1, 2).reshape(-1, t3.shape[1])


def _put(dst3: Tensor, c: _Chunk, src: Tensor) -> None:
    """Write the chunk's pixel-major [P, C] into [N, C, Ho*Wo]."""
    dst3[c.n0 : c.n1, :, c.p0 : c.p1].copy_(src.view(c.n1 - c.n0, c.p1 - c.p0, -1).transpose(1, 2))


class DeformConv2dFunction(torch.autograd.Function):
    """Modulated deformable conv with a hand-written backward (see the module docstring)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        input: Tensor,
        offset: Tensor,
        mask: Tensor | None,
        weight: Tensor,
        bias: Tensor | None,
        geo: Geometry,
        chunk_bytes: int,
        save_bytes: int,
    ) -> Tensor:
        step = chunk_pixels(geo, input.element_size(), chunk_bytes)
        chunks = _chunks(geo, step)
        groups = _split(chunks, geo, _workers(input.device))
        max_bags = max((c.n1 - c.n0) * (c.p1 - c.p0) for c in chunks) * geo.dg * geo.k2 if chunks else 0
        plan = _plan(geo, input.dtype, input.device, max_bags)
        hw = geo.ho * geo.wo
        table = _to_table(input, geo)
        offset3 = offset.reshape(geo.n, 2 * geo.dg * geo.k2, hw)
        mask3 = None if mask is None else mask.reshape(geo.n, geo.dg * geo.k2, hw)
        wm = _weight_matrix(weight, geo)
        out = input.new_empty(geo.n, geo.cout, geo.ho, geo.wo)
        out3 = out.view(geo.n, geo.cout, hw)
        keep = geo.pixels * geo.k * input.element_size() <= save_bytes

        def work(job: int) -> list[Tensor]:
            columns = []
            for c in groups[job]:
                s = _samples(plan, _take(offset3, c), _take(mask3, c), *c.flat(hw))
                weights = torch.stack(s.corner_weights(), dim=-1).view(-1)
                col = _gather(table, s.corners(plan), weights, plan).view(-1, geo.k)
                res = torch.addmm(bias, col, wm) if bias is not None else torch.mm(col, wm)
                _put(out3, c, res)
                if keep:
                    columns.append(col)
            return columns

        columns = _run(work, len(groups))
        ctx.geo = geo
        ctx.plan = plan  # constants only (no autograd history)
        ctx.groups = groups
        ctx.has_mask = mask is not None
        ctx.has_bias = bias is not None
        ctx.columns = columns if keep else None
        # The input is usually saved anyway (by the offset conv); the table is rebuilt in backward.
        ctx.save_for_backward(input, offset, mask if mask is not None else input.new_empty(0), weight)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        input, offset, mask, weight = ctx.saved_tensors
        geo: Geometry = ctx.geo
        plan: _Plan = ctx.plan  # kept on ctx: backward may run again with retain_graph=True
        groups: list[list[_Chunk]] = ctx.groups
        columns: list[list[Tensor]] | None = ctx.columns
        need_input, need_offset, need_mask, need_weight, need_bias = ctx.needs_input_grad[:5]
        need_mask = need_mask and ctx.has_mask
        need_bias = need_bias and ctx.has_bias
        need_dots = need_offset or need_mask
        hw = geo.ho * geo.wo
        table = _to_table(input, geo)
        offset3 = offset.reshape(geo.n, 2 * geo.dg * geo.k2, hw)
        mask3 = mask.reshape(geo.n, geo.dg * geo.k2, hw) if ctx.has_mask else None
        grad3 = grad_out.reshape(geo.n, geo.cout, hw)
        wm = _weight_matrix(weight, geo)
        wm_t = wm.t().contiguous()
        grad_offset = torch.empty_like(offset, memory_format=torch.contiguous_format) if need_offset else None
        grad_mask = torch.empty_like(mask, memory_format=torch.contiguous_format) if need_mask else None
        grad_offset3 = None if grad_offset is None else grad_offset.view(geo.n, -1, hw)
        grad_mask3 = None if grad_mask is None else grad_mask.view(geo.n, -1, hw)
        rows_per_image = geo.dg * geo.hp * geo.wp
        images = [_images(g) for g in groups]
        shared = {
            i
            for i, (lo, hi) in enumerate(images)
            for j, (lo2, hi2) in enumerate(images)
            if i != j and lo < hi2 and lo2 < hi
        }
        # Workers zero (and fill) the gradient rows of their own images; rows of an image that two workers share
        # are accumulated privately and added afterwards.
        grad_table = None
        if need_input:
            grad_table = torch.zeros_like(table) if shared else torch.empty_like(table)

        def work(job: int) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
            grad_wm = torch.zeros_like(wm) if need_weight else None
            grad_b = wm.new_zeros(geo.cout) if need_bias else None
            img_lo, img_hi = images[job]
            base_row = img_lo * rows_per_image
            own = None
            if grad_table is not None:
                own = grad_table[base_row : img_hi * rows_per_image]
                if job in shared:  # another worker writes rows of the same image: accumulate privately
                    own = torch.zeros_like(own)
                elif not shared:
                    own.zero_()
            for i, c in enumerate(groups[job]):
                s = _samples(plan, _take(offset3, c), _take(mask3, c), *c.flat(hw))
                corners, weights = s.corners(plan), s.corner_weights()
                g_chunk = _take(grad3, c)
                if grad_b is not None:
                    grad_b += g_chunk.sum(0)
                if grad_wm is not None:
                    col = columns[job][i] if columns is not None else None
                    if col is None:
                        col = _gather(table, corners, torch.stack(weights, dim=-1).view(-1), plan)
                    grad_wm.addmm_(col.view(-1, geo.k).t(), g_chunk)
                if not (need_input or need_dots):
                    continue
                gcol = torch.mm(g_chunk, wm_t).view(-1, geo.cg)
                if need_dots:
                    g_mask, g_y, g_x = s.coordinate_grads(_corner_dots(table, gcol, corners, plan))
                    if grad_mask3 is not None:
                        _put(grad_mask3, c, g_mask.reshape(g_mask.shape[0], -1))
                    if grad_offset3 is not None:
                        _put(grad_offset3, c, torch.stack((g_y, g_x), dim=-1).view(g_y.shape[0], -1))
                if own is not None:
                    _scatter(own, base_row, gcol, s.rows, weights, plan)
            return grad_wm, grad_b, (own if job in shared else None)

        results = _run(work, len(groups))
        grad_input = grad_weight = grad_bias = None
        if grad_table is not None:
            for (_, _, private), (img_lo, img_hi) in zip(results, images):
                if private is not None:
                    grad_table[img_lo * rows_per_image : img_hi * rows_per_image].add_(private)
            grad_input = _from_table(grad_table, geo)
        if need_weight:
            grad_weight = _weight_grad(sum(r[0] for r in results), geo)
        if need_bias:
            grad_bias = sum(r[1] for r in results)
        return grad_input, grad_offset, grad_mask, grad_weight, grad_bias, None, None, None


def deform_conv2d_native(
    input: Tensor,
    offset: Tensor,
    mask: Tensor | None,
    weight: Tensor,
    bias: Tensor | None,
    geo: Geometry,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    save_bytes: int = DEFAULT_SAVE_BYTES,
) -> Tensor:
    """Run :class:`DeformConv2dFunction` (inputs must already be validated against ``geo``)."""
    return DeformConv2dFunction.apply(input, offset, mask, weight, bias, geo, chunk_bytes, save_bytes)
