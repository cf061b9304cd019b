// Local relation op, CUDA kernels v12 (DESIGN.md §1): tiled, register-blocked strips unrolled over
// their rows, no per-thread window arrays, fp32 tiles copied by cp.async on sm_80+, grad k formed
// by the backward query, staged channels side by side and read by vector loads; small images
// packed several per block (lr_*_packed: one image per slot, tiles in dynamic shared memory).
//
// Templated on the storage type T (float, lr_half, lr_bf16; all arithmetic in fp32), the window
// size K and the stride; every tensor extent is a kernel argument; offsets within a group of
// channels are 32-bit (cupy_backend.offsets_fit), the others 64-bit.
// The composability is a runtime argument (LR_SQDIFF, LR_ABSDIFF, LR_MUL), dispatched once.
//
// Layouts (all contiguous NCHW): x (B, C, H, W), q (B, G, Ho, Wo), k (B, G, H, W), geo (G, K, K)
// in fp32, y (B, C, Ho, Wo), lse (B, G, Ho, Wo) in fp32. Channel c belongs to group c / m, the
// last group may hold fewer than m channels. Output (i, j) reads input
// (i * STRIDE - K / 2 + a, j * STRIDE - K / 2 + b); neighbours outside the image are left out of
// the softmax.
//
// Every block is LR_TILE_W x LR_TILE_H threads and works on one tile of one (b, g) plane at a
// time (grid-stride over tiles, so any grid size is correct). Each thread owns a vertical strip
// of R positions (register blocking, lr_common.cuh: R = lr_forward_strip outputs in the
// forward, lr_query_strip in the backward query, R = lr_input_strip inputs in the backward
// input), so a tile is LR_TILE_W x LR_TILE_H * R positions. The tile's k (or q) with its halo
// and MC = lr_chunk channels of x (or gy) are staged in shared memory (fp32), the channels in
// groups of V side by side at each position (lr_vec_width), read with one V-word load.
// The window loops run over window columns outside and the strip's rows inside (unrolled in
// the forward and backward query, lr_strip_columns): a window word read from shared memory
// once serves every position of the strip whose window holds it, so a thread holds R x MC
// accumulators, never a K x K array.
// Strided window reads go through the phase-ordered, padded layout of lr_common.cuh (one
// shared-memory transaction per warp request, counted by tests/test_kernels_budget.py). A warp
// whose strips lie wholly below the image skips the window loops (it still takes part in the
// loads and barriers; in the backward query it hands zeros to the grad-geo reduction).
//
// The composability is a template parameter of the tile bodies (lr_*_tiles<T, K, STRIDE, COMP>);
// each kernel picks the body once per launch from its runtime argument (LR_BY_COMPOSABILITY),
// so the window loops carry no composability branch. The softmax runs in base 2 (lr_exp2), its
// logits formed in base 2 by every kernel alike (lr_logit2: the query scaled, the prior logits
// staged by lr_stage_geo as (geo - bound) * log2(e)).
// The forward and backward query stage k outside the image as LR_FAR_KEY, so that sqdiff's and
// absdiff's weights there are exactly 0 without a test in the window loops (mul tests).
//
// Forward: exp(logit - shift) accumulated into the sum and the MC channel outputs, the shift an
// upper bound on the logits: for sqdiff and absdiff (phi <= 0) the group's largest prior logit,
// with the exact largest logit (a first pass) where a weight sum underflows from the bound;
// for mul the exact largest logit always (FlashAttention's softmax without the rescaling).
// Backward (p = softmax weights of one (b, g, i, j), recomputed from the saved lse; gy = grad y):
//   dw_o = sum_{c in g} gy_c x_{o,c},  D = sum_c gy_c y_c (FlashAttention's delta, from the
//   saved output), dlogit_o = p_o (dw_o - D), formed offset by offset.
// lr_backward_query owns the query positions and the dlogits: grad q, one partial of grad k per
// tile (dlogit x dphi/dk summed in shared memory over the tile's staged positions) and one
// partial sum of grad geo per block (each window row's dlogits reduced through shared memory in
// a fixed order; the caller sums the partials with torch.sum, so grad geo is deterministic for
// a given grid). lr_backward_input owns the input positions: it gathers grad x from the outputs
// whose window covers them and sums grad k from the tile partials that hold each input (2 x 2
// at most where a strip is 2 outputs tall), in a fixed order. No atomics anywhere.
#include "lr_common.cuh"

// Tile geometry of lr_forward and lr_backward_query (one home for the kernels and the bodies):
// strips of R outputs (lr_forward_strip, lr_query_strip), tiles of LR_TILE_W x OTH outputs over
// IH x IW input positions staged at pitch PW (TF floats per tile); a strip reads NT input rows
// and each strip row serves the window rows t - d, d < L; MC channels staged at once (forward,
// backward query).
template <int K, int STRIDE, int STRIP>
struct lr_query_shape {
    static constexpr int R = STRIP;
    static constexpr int OTH = LR_TILE_H * R;
    static constexpr int IH = (OTH - 1) * STRIDE + K;
    static constexpr int IW = (LR_TILE_W - 1) * STRIDE + K;
    static constexpr int PW = lr_pitch<IW, STRIDE, R * STRIDE>();
    static constexpr int TF = IH * PW;
    static constexpr int SLOT = TF;  // one tile (the names of lr_query_packed_shape)
    static constexpr int NT = (R - 1) * STRIDE + K;
    static constexpr int L = (R - 1) * STRIDE + 1;
    // backward query: its key-gradient copies (LR_TILE_H of GS floats) in shared memory or not
    static constexpr bool GK_SHARED = lr_key_grad_shared<K, STRIDE>();
    static constexpr int GS = lr_key_grad_pitch<K, STRIDE, R>();
    static constexpr int MC_QUERY = lr_chunk<lr_query_fixed<K, STRIDE, R, GK_SHARED>(), TF>();
    static constexpr int V_QUERY = lr_vec_width<MC_QUERY>();
};

// Tile geometry of lr_backward_query_packed (small images): LR_SLOTS / 2 images of one group per
// block, one per slot of LR_SLOT_W x OTH outputs (four thread rows of strips of R =
// lr_query_strip; a warp holds two slots side by side), with the names of lr_query_shape: each
// slot's IH x IW input positions staged at pitch PW, SLOT floats apart (TF floats per plane);
// the key-gradient copies one per (thread row, slot column), GS floats apart (8 modulo 32: the
// four copies a warp adds into fall in distinct banks); all LR_MAX_CHUNK channels staged; FLOATS
// of dynamic shared memory in all (the tiles, the copies, geo, the grad-geo reduction's rows and
// partial sums and the block's grad geo).
template <int K, int STRIDE>
struct lr_query_packed_shape {
    static constexpr int SLOTS = LR_SLOTS / 2;
    static constexpr int R = lr_query_strip<K, STRIDE>();
    static constexpr int OTH = 4 * R;
    static constexpr int IH = (OTH - 1) * STRIDE + K;
    static constexpr int IW = (LR_SLOT_W - 1) * STRIDE + K;
    static constexpr int STEP = R * STRIDE;  // input rows between a warp's two thread rows
    static constexpr int PW = lr_slot_pitch<STRIDE * lr_phase_cols<IW, STRIDE>(), STEP>();
    static constexpr int SLOT = lr_slot_floats<IH * PW, STEP * PW % 32>();
    static constexpr int TF = SLOTS * SLOT;
    static constexpr int NT = (R - 1) * STRIDE + K;
    static constexpr int L = (R - 1) * STRIDE + 1;
    static constexpr bool GK_SHARED = true;
    static constexpr int GS = NT * PW + (40 - NT * PW % 32) % 32;  // >= NT * PW, 8 modulo 32
    static constexpr int MC_QUERY = LR_MAX_CHUNK;
    static constexpr int V_QUERY = lr_vec_width<MC_QUERY>();
    static constexpr int FLOATS = (MC_QUERY + 1) * TF + 2 * LR_TILE_H * GS + 2 * K * K +
                                  K * LR_RED_PITCH + K * 8;
    // the image positions a slot stages, at most BOX_H x BOX_W
    static constexpr int BOX_H = OTH * STRIDE < IH - K / 2 ? OTH * STRIDE : IH - K / 2;
    static constexpr int BOX_W = LR_SLOT_W * STRIDE < IW - K / 2 ? LR_SLOT_W * STRIDE : IW - K / 2;
};

// Tile geometry of lr_backward_query_pairs (images of at most one tile, stride 1): LR_PAIR_SLOTS
// images of one group per block, one per slot of a whole tile of lr_query_shape (LR_TILE_W x
// OTH outputs, eight strips of R a column) run in PASSES passes of four thread rows; a warp
// holds one thread row of each slot (lanes 0-15 slot 0, 16-31 slot 1), so that at 14 x 14 the
// second pass's last warp, wholly below both images, skips the window loops (in the tiled
// kernel the row below the image shares a warp with a live one). Each slot's IH x IW input
// positions staged at the tiled pitch PW, SLOT floats apart, 16 modulo 32 (the two half-warps'
// reads fall in distinct banks); a key-gradient copy per (thread row, slot), GS floats apart
// (16 modulo 32); all LR_MAX_CHUNK channels staged; FLOATS of dynamic shared memory in all.
template <int K, int STRIDE>
struct lr_query_pairs_shape {
    static constexpr int SLOTS = LR_PAIR_SLOTS;
    static constexpr int PASSES = 2;
    static constexpr int R = lr_query_strip<K, STRIDE>();
    static constexpr int OTH = LR_TILE_H * R;
    static constexpr int IH = (OTH - 1) * STRIDE + K;
    static constexpr int IW = (LR_TILE_W - 1) * STRIDE + K;
    static constexpr int PW = lr_pitch<IW, STRIDE, R * STRIDE>();
    static constexpr int SLOT = lr_padded_pitch<IH * PW, 1>();  // 16 modulo 32
    static constexpr int TF = SLOTS * SLOT;
    static constexpr int NT = (R - 1) * STRIDE + K;
    static constexpr int L = (R - 1) * STRIDE + 1;
    static constexpr bool GK_SHARED = true;
    static constexpr int GS = lr_key_grad_pitch<K, STRIDE, R>();  // 16 modulo 32
    static constexpr int MC_QUERY = LR_MAX_CHUNK;
    static constexpr int V_QUERY = lr_vec_width<MC_QUERY>();
    static constexpr int FLOATS = (MC_QUERY + 1) * TF + 2 * LR_TILE_H * GS + 2 * K * K +
                                  K * LR_RED_PITCH + K * 8;
    static constexpr int BOX_H = OTH * STRIDE < IH - K / 2 ? OTH * STRIDE : IH - K / 2;
    static constexpr int BOX_W = LR_TILE_W * STRIDE < IW - K / 2 ? LR_TILE_W * STRIDE : IW - K / 2;
};

// A where C, else B (std::conditional: the kernels include no standard header, for NVRTC).
template <bool C, typename A, typename B>
struct lr_pick {
    using type = A;
};
template <typename A, typename B>
struct lr_pick<false, A, B> {
    using type = B;
};

// Tile geometry of lr_forward (SLOTS = 1: one tile of lr_query_shape per block), of
// lr_forward_pairs (SLOTS = LR_PAIR_SLOTS images per block, one per slot of OW x OH outputs,
// four thread rows of strips of R) and of lr_forward_packed (SLOTS = LR_SLOTS small images per
// block, one per slot of OW x OH outputs, two thread rows of strips of R; lr_common.cuh); each
// slot's IH x IW input positions staged at pitch PW, SLOT floats apart (TF floats per plane);
// MC channels staged at once: as many as 48 KB of static shared memory hold (lr_forward), all
// LR_MAX_CHUNK (the others, in dynamic shared memory: FLOATS in all).
template <int K, int STRIDE, int SLOTS>
struct lr_forward_shape {
    static constexpr int R = lr_forward_strip<K, STRIDE>();
    static constexpr int OW = lr_slot_cols<SLOTS>();
    static constexpr int OH = lr_slot_rows<SLOTS>() * R;
    static constexpr int IH = (OH - 1) * STRIDE + K;
    static constexpr int IW = (OW - 1) * STRIDE + K;
    static constexpr int STEP = R * STRIDE;  // input rows between the two thread rows of a warp
    static constexpr int PW = SLOTS != LR_SLOTS
                                  ? lr_pitch<IW, STRIDE, STEP>()
                                  : lr_slot_pitch<STRIDE * lr_phase_cols<IW, STRIDE>(), STEP>();
    static constexpr int SLOT =
        SLOTS != LR_SLOTS ? IH * PW : lr_slot_floats<IH * PW, STEP * PW % 32>();
    static constexpr int TF = SLOTS * SLOT;
    static constexpr int NT = (R - 1) * STRIDE + K;
    static constexpr int L = (R - 1) * STRIDE + 1;
    static constexpr int GEO = lr_forward_geo<K>();
    static constexpr int MC = SLOTS == 1 ? lr_chunk<TF + GEO, TF>() : LR_MAX_CHUNK;
    // channels side by side (lr_vec_width): quads, also at strips of 4 since v11 (their 4 x MC
    // accumulators had left no registers for them up to v10: pairs or quads spilled 4-20 bytes
    // under the 128-register cap; v11's window masks of one register each and 32-bit chunk
    // loop made the room)
    static constexpr int V = lr_vec_width<MC>();
    static constexpr int FLOATS = (MC + 1) * TF + GEO;
    static_assert(SLOTS == 1 || TF % 4 == 0, "whole 4-word fills (lr_fill_shared)");
    // lr_forward_pairs, lr_forward_packed: the image positions a slot's window holds, at most
    // BOX_H x BOX_W (an image of at most OH x OW outputs is at most OH * STRIDE x OW * STRIDE)
    static constexpr int BOX_H = OH * STRIDE < IH - K / 2 ? OH * STRIDE : IH - K / 2;
    static constexpr int BOX_W = OW * STRIDE < IW - K / 2 ? OW * STRIDE : IW - K / 2;
};

// Tile geometry of lr_backward_input (SLOTS = 1), lr_backward_input_pairs (SLOTS =
// LR_PAIR_SLOTS images per block, stride 1: one per slot of ITW x ITH inputs, four thread rows
// of strips of RI) and lr_backward_input_packed (SLOTS = LR_SLOTS small images per block, stride
// 1: one per slot of ITW x ITH inputs, two thread rows of strips of RI; lr_common.cuh): strips of
// RI inputs, tiles (slots) of ITW x ITH inputs; the outputs covering a tile are OH x OW, staged
// at pitch PO, SLOT floats apart (TO floats per plane); a strip is covered by NT output rows and
// NC output columns; MC gy channels staged at once (all LR_MAX_CHUNK in the packed kernels'
// dynamic shared memory: FLOATS in all).
template <int K, int STRIDE, int SLOTS = 1>
struct lr_input_shape {
    static_assert(SLOTS == 1 || STRIDE == 1, "packed at stride 1 only");
    static constexpr int RI = lr_input_strip<K, STRIDE>();
    static constexpr int ITW = lr_slot_cols<SLOTS>();
    static constexpr int ITH = lr_slot_rows<SLOTS>() * RI;
    static constexpr int NC = (K - 1) / STRIDE + 1;  // most outputs covering an input, per axis
    static constexpr int NT = (RI + STRIDE - 2) / STRIDE + NC;
    // i_first of the tile's last row is at most ceil((ITH - 1) / STRIDE) past the first row's,
    // and each row reads NC of them
    static constexpr int OH = (ITH + STRIDE - 2) / STRIDE + NC;
    static constexpr int OW = (ITW + STRIDE - 2) / STRIDE + NC;
    static constexpr int PO =
        SLOTS != LR_SLOTS ? lr_plain_pitch<OW, STRIDE, RI>() : lr_slot_pitch<OW, RI>();
    static constexpr int SLOT =
        SLOTS != LR_SLOTS ? OH * PO : lr_slot_floats<OH * PO, RI * PO % 32>();
    static constexpr int TO = SLOTS * SLOT;
    static constexpr int MC = SLOTS == 1 ? lr_chunk<2 * TO + K * K, TO>() : LR_MAX_CHUNK;
    static constexpr int V = lr_vec_width<MC>();  // gy channels side by side
    static constexpr int FLOATS = (2 + MC) * TO + K * K;
    // lr_backward_input_packed: the first output row (column) staged, relative to the image's
    // first input, and the image outputs a slot stages, at most BOX_H x BOX_W
    static constexpr int OI0 = (K / 2 - K + STRIDE) / STRIDE;  // floor: K / 2 - K + 1 < 0
    static constexpr int BOX_H = ITH < OH + OI0 ? ITH : OH + OI0;
    static constexpr int BOX_W = ITW < OW + OI0 ? ITW : OW + OI0;
};

// Call FN<T, K, STRIDE, COMP>(...) for the runtime composability code comp: the window loops
// are compiled once per composability, and the choice is made once per launch.
#define LR_BY_COMPOSABILITY(comp, FN, ...)                           \
    if ((comp) == LR_SQDIFF) {                                        \
        FN<T, K, STRIDE, LR_SQDIFF>(__VA_ARGS__);                     \
    } else if ((comp) == LR_ABSDIFF) {                                \
        FN<T, K, STRIDE, LR_ABSDIFF>(__VA_ARGS__);                    \
    } else {                                                          \
        FN<T, K, STRIDE, LR_MUL>(__VA_ARGS__);                        \
    }


// Forward, fused: logits, softmax and aggregation; one thread per strip of R outputs
// (i0 + r, j), r < R, of a tile. Shared: the k tile (logits) and MC channel tiles of x.
// SLOTS = 1 (lr_forward): a tile of LR_TILE_W x LR_TILE_H * R outputs of one (b, g) plane.
// SLOTS = LR_PAIR_SLOTS (lr_forward_pairs, images of at most LR_TILE_W x (LR_TILE_H / 2) R
// outputs) or LR_SLOTS (lr_forward_packed, images of at most LR_SLOT_W x 2R outputs): the whole
// images of SLOTS consecutive b of one g, thread (tx, ty) in slot lr_slot_of (LR_SLOTS: a warp
// holds two slots side by side), its strip at (ty % rows) * R, tx % cols (a slot's
// lr_slot_rows and lr_slot_cols).
template <typename T, int K, int STRIDE, int COMP, int SLOTS>
__device__ __forceinline__ void lr_forward_tiles(
    const T* __restrict__ x, const T* __restrict__ q, const T* __restrict__ k,
    const float* __restrict__ geo, T* __restrict__ y, float* __restrict__ lse, long long B,
    long long C, long long H, long long W, long long G, long long m, long long Ho, long long Wo,
    float* __restrict__ s_k, float* __restrict__ s_x, float* __restrict__ s_geo) {
    using S = lr_forward_shape<K, STRIDE, SLOTS>;
    constexpr int P = K / 2, KK = K * K, R = S::R, OH = S::OH, IH = S::IH, IW = S::IW;
    constexpr int PW = S::PW, TF = S::TF, NT = S::NT, L = S::L, MC = S::MC, V = S::V;
    constexpr bool PACKED = SLOTS > 1;
    const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * LR_TILE_W + tx;
    // packed: this thread's slot and its place in the slot
    const int slot = lr_slot_of<SLOTS>(tx, ty);
    const int sx = tx % lr_slot_cols<SLOTS>(), sy = ty % lr_slot_rows<SLOTS>();
    const long long tiles_w = PACKED ? 1 : (Wo + LR_TILE_W - 1) / LR_TILE_W;
    const long long tiles_h = PACKED ? 1 : (Ho + OH - 1) / OH;
    const long long images = PACKED ? (B + SLOTS - 1) / SLOTS : B;  // per group, per tile
    // this thread's window in the tiles
    const int base =
        PACKED ? slot * S::SLOT + sy * R * STRIDE * PW + sx : ty * R * STRIDE * PW + tx;

    if constexpr (PACKED) {  // what lies outside the images, once: the loads write the rest
        lr_fill_shared<TF>(s_k, LR_FAR_KEY, tid);
        lr_fill_shared<MC * TF>(s_x, 0.0f, tid);
    }
    // images * G * tiles_h * tiles_w tiles, recounted at each test (lr_opaque: not held in
    // registers)
    for (long long tile = blockIdx.x; tile < lr_opaque(images) * G * tiles_h * tiles_w;
         tile += gridDim.x) {
        // the list of lr_tile_of, taken apart by 5 divisions: with lr_tile_of's 3, ptxas spills
        // lr_forward<float, 5, 1> on sm_90 (4 bytes; v13, tests/test_kernels_budget.py)
        const long long tw = tile % tiles_w;
        const long long th = (tile / tiles_w) % tiles_h;
        const long long g = (tile / (tiles_w * tiles_h)) % G;
        const long long b0 = tile / (tiles_w * tiles_h * G) * SLOTS;  // the tile's first image
        const long long b = PACKED ? b0 + slot : b0;
        // (pairs: opaque, or ptxas specialises the window loops on the small values and spills)
        const long long i0 = !PACKED ? th * OH + ty * R
                             : SLOTS == LR_PAIR_SLOTS ? lr_opaque((long long)sy * R)
                                                      : sy * R;
        const long long j = !PACKED ? tw * LR_TILE_W + tx
                            : SLOTS == LR_PAIR_SLOTS ? lr_opaque((long long)sx)
                                                     : sx;
        const long long r0 = th * OH * STRIDE - P, c0 = tw * LR_TILE_W * STRIDE - P;
        // uniform over the warp (packed: its first slot holds an image)
        const bool warp_live = PACKED ? b0 + lr_warp_first_slot<SLOTS>(slot) < B
                                      : th * OH + (ty & ~1) * R < Ho;
        const long long qplane = (b * G + g) * Ho;
        const int slots = B - b0 < SLOTS ? (int)(B - b0) : SLOTS;  // slots holding an image

        __syncthreads();  // the previous tile is done with s_k, s_x and s_geo
        // the prior logits in base 2 less their bound (pass 2 starts from it), and whether one is
        // NaN (pass 2 then tests every neighbour: the NaN must not reach the outputs whose window
        // leaves the image at that offset)
        bool nan_prior;
        const float bound = lr_stage_geo<KK>(s_geo, geo + g * KK, tid, nan_prior);
        if constexpr (PACKED) {
            lr_load_slots<IH, IW, STRIDE, PW, 1, 1, SLOTS, S::SLOT, S::BOX_H, S::BOX_W>(
                s_k, 0, k + (b0 * G + g) * H * W, 0, 1, -P, -P, H, W, tid, G * H * W, slots);
        } else {
            lr_load_phased<IH, IW, STRIDE, PW, 1>(s_k, 0, k + (b * G + g) * H * W, 0, 1, r0, c0, H,
                                                  W, tid, LR_FAR_KEY);
        }
        __syncthreads();

        // output r exists iff r < outs
        const int outs = b < B ? lr_strip_outputs<R>(i0, j, Ho, Wo) : 0;
        // the strip's q and lse from one address each, at 32-bit offsets (a group's channel
        // planes span fewer than 2^31 positions: cupy_backend.offsets_fit)
        const int row = (int)Wo;
        const long long strip_at = (qplane + i0) * Wo + j;
        const T* const q_strip = lr_opaque(q + strip_at);
        float qv[R];
#pragma unroll
        for (int r = 0; r < R; ++r) {  // scaled (lr_logit2)
            qv[r] = r < outs ? lr_load(q_strip, r * row) * lr_query_scale(COMP) : 0.0f;
        }
        const lr_window<NT, K> win(i0 * STRIDE - P, j * STRIDE - P, H, W);
        // the logits in base 2 less the bound, l2 = (l - bound) * log2(e) (lr_logit2); pass 2's
        // weights are 2^(l2 + shift), shift <= -max l2: 0 from the bound, or -max l2 (pass 1)
        float shift[R];
        // pass 1: shift from the largest logit in the image (fmaxf skips a NaN logit; pass 2
        // turns it into a NaN weight, so NaN in gives NaN out). Output r, offset (a, bb) reads
        // strip row t = r * STRIDE + a.
        const auto exact_shift = [&]() {
            float peak[R];
#pragma unroll
            for (int r = 0; r < R; ++r) peak[r] = -3.0e38f;
            // strip rows unrolled (here and in every window loop): the row tests are constants,
            // the register-window shifts renames. A warp below the image skips the loops.
            if (warp_live) {
                lr_strip_columns<NT, K, L, IW, STRIDE, PW>(
                    win, base, s_geo, true,
                    [&](int t, int s, bool ok, const float* gw) {
                        const float kv = s_k[s];
                        lr_strip_pairs<R, K, STRIDE>(t, [&](int r) {
                            const float l2 = lr_logit2(COMP, qv[r], kv, gw[r * STRIDE]);
                            if (COMP != LR_MUL || ok) peak[r] = fmaxf(peak[r], l2);
                        });
                    },
                    [](int) {});
            }
#pragma unroll
            for (int r = 0; r < R; ++r) shift[r] = -peak[r];
        };
        // sqdiff and absdiff logits are at most the group's largest prior logit (phi <= 0), so
        // their pass 2 starts from that bound without pass 1; a strip whose weight sum then falls
        // below LR_SUM_FLOOR (every logit far below the bound, the largest weights near
        // underflow) runs pass 1 and pass 2 again. mul runs pass 1 first.
        bool exact = COMP == LR_MUL;
        if (exact) exact_shift();
        bool shifted = exact;  // pass 1 has run (exact can be set without it, below)

        // pass 2, per chunk of MC channels: weights, their sums and the R x MC outputs
        const long long c_first = g * m;
        const int mg = (int)(c_first + m < C ? m : C - c_first);  // channels of group g (< 2^31)
        for (int cg = 0; cg < mg; cg += MC) {  // chunk of channels c_first + cg + c, c < nc
            const long long cc = c_first + cg;
            const int nc = mg - cg < MC ? mg - cg : MC;
            __syncthreads();  // everyone is done with the previous chunk in s_x
            if constexpr (PACKED) {
                lr_load_slots<IH, IW, STRIDE, PW, MC, V, SLOTS, S::SLOT, S::BOX_H, S::BOX_W>(
                    s_x, TF, x + (b0 * C + cc) * H * W, H * W, nc, -P, -P, H, W, tid, C * H * W,
                    slots);
            } else {
                lr_load_phased<IH, IW, STRIDE, PW, MC, V>(s_x, TF, x + (b * C + cc) * H * W,
                                                          H * W, nc, r0, c0, H, W, tid);
            }
            __syncthreads();
            if (!exact && cg == 0) {
#pragma unroll
                for (int r = 0; r < R; ++r) shift[r] = 0.0f;
            }
            float acc[R][MC], sum[R];
            for (;;) {
#pragma unroll
                for (int r = 0; r < R; ++r) {
                    sum[r] = 0.0f;
#pragma unroll
                    for (int c = 0; c < MC; ++c) acc[r][c] = 0.0f;
                }
                // general: weights 2^(l2 + shift), a neighbour outside the image 0 by a test
                // (mul, a NaN prior logit, or after pass 1); otherwise 2^l2 (shift 0, from the
                // bound), 0 outside the image by its key (LR_FAR_KEY). Each call below passes a
                // constant, so the window loop is compiled once per value.
                const auto window = [&](bool general) {
                    lr_strip_columns<NT, K, L, IW, STRIDE, PW>(
                        win, base, s_geo, true,
                        [&](int t, int s, bool ok, const float* gw) {
                            float xv[MC];
                            const float kv = lr_read_staged<MC, TF, V>(s_k, s_x, s, xv);
                            lr_strip_pairs<R, K, STRIDE>(t, [&](int r) {
                                const float l2 = lr_logit2(COMP, qv[r], kv, gw[r * STRIDE]);
                                const float e = lr_exp2(general ? l2 + shift[r] : l2);
                                const float p = !general || ok ? e : 0.0f;
                                sum[r] += p;
#pragma unroll
                                for (int c = 0; c < MC; ++c) acc[r][c] += p * xv[c];
                            });
                        },
                        [](int) {});
                };
                if (warp_live && (COMP == LR_MUL || nan_prior || shifted)) {
                    window(true);
                } else if (warp_live) {
                    window(false);
                }
                if (exact) break;
                bool low = false;  // the bound was too far above the logits of an output
#pragma unroll
                for (int r = 0; r < R; ++r) low = low || (r < outs && sum[r] < LR_SUM_FLOOR);
                exact = true;  // the later chunks keep this shift
                if (!low) break;
                exact_shift();
                shifted = true;
            }
            // the strip's outputs from one address (its first channel's), at 32-bit offsets
            T* const y_strip = y + ((b * C + cc) * Ho + i0) * Wo + j;
            const int plane = (int)(Ho * Wo);
            // channel c's offset; the channels past a ragged chunk (c >= nc) store to channel
            // nc - 1, in descending order below, so that its own value is the one stored last
            // (no test per store)
            int channel[MC];
#pragma unroll
            for (int c = 0; c < MC; ++c) channel[c] = (c < nc ? c : nc - 1) * plane;
#pragma unroll
            for (int r = 0; r < R; ++r) {
                if (r >= outs) continue;
                if (cg == 0) {
                    const float log_sum = fmaf(lr_log2(sum[r]) - shift[r], LR_LN2, bound);
                    lr_store(lr_opaque(lse + strip_at), r * row, log_sum);
                }
                const float inv = lr_rcp(sum[r]);
                T* const y_r = lr_opaque(y_strip + r * row);
#pragma unroll
                for (int c = MC - 1; c >= 0; --c) lr_store(y_r, channel[c], acc[r][c] * inv);
            }
        }
    }
}

// The tile body by layout (SLOTS images a tile: 1, LR_PAIR_SLOTS or LR_SLOTS), for
// LR_BY_COMPOSABILITY.
template <int SLOTS>
struct lr_forward_in {
    template <typename T, int K, int STRIDE, int COMP, typename... A>
    __device__ static __forceinline__ void run(A... args) {
        lr_forward_tiles<T, K, STRIDE, COMP, SLOTS>(args...);
    }
};

// The body of lr_forward_pairs and lr_forward_packed: SLOTS images per block, the tiles in
// dynamic shared memory (lr_forward_shape's FLOATS: the MC channel tiles, then the k tile and
// geo; over 48 KB the launch opts in).
template <typename T, int K, int STRIDE, int SLOTS>
__device__ __forceinline__ void lr_forward_in_slots(
    const T* __restrict__ x, const T* __restrict__ q, const T* __restrict__ k,
    const float* __restrict__ geo, T* __restrict__ y, float* __restrict__ lse, long long B,
    long long C, long long H, long long W, long long G, long long m, long long Ho, long long Wo,
    int comp) {
    using S = lr_forward_shape<K, STRIDE, SLOTS>;
    LR_DYNAMIC_SHARED(float, s_x);
    float* const s_k = s_x + S::MC * S::TF;
    float* const s_geo = s_k + S::TF;
    LR_BY_COMPOSABILITY(comp, lr_forward_in<SLOTS>::template run, x, q, k, geo, y, lse, B, C, H,
                        W, G, m, Ho, Wo, s_k, s_x, s_geo)
}

template <typename T, int K, int STRIDE>
__global__ void __launch_bounds__(LR_THREADS, LR_MIN_BLOCKS) lr_forward(
    const T* __restrict__ x, const T* __restrict__ q, const T* __restrict__ k,
    const float* __restrict__ geo, T* __restrict__ y, float* __restrict__ lse, long long B,
    long long C, long long H, long long W, long long G, long long m, long long Ho, long long Wo,
    int comp) {
    using S = lr_forward_shape<K, STRIDE, 1>;
    // one array (lr_backward_query): MC channel tiles, the k tile, geo
    LR_SHARED_VECTORS(float, s_x, S::MC * S::TF + S::TF + S::GEO);
    float* const s_k = s_x + S::MC * S::TF;
    float* const s_geo = s_k + S::TF;
    LR_BY_COMPOSABILITY(comp, lr_forward_in<1>::template run, x, q, k, geo, y, lse, B, C, H, W, G,
                        m, Ho, Wo, s_k, s_x, s_geo)
}

// lr_forward on images of at most LR_TILE_W x (LR_TILE_H / 2) R outputs (R = lr_forward_strip):
// LR_PAIR_SLOTS images per block (lr_forward_in_slots; over 48 KB of dynamic shared memory at
// K >= 11 at stride 1, K >= 5 at stride 2: cupy_backend.pairs_shared_bytes). Every warp of a
// block holds strips of one image.
template <typename T, int K, int STRIDE>
__global__ void __launch_bounds__(LR_THREADS, LR_MIN_BLOCKS) lr_forward_pairs(
    const T* __restrict__ x, const T* __restrict__ q, const T* __restrict__ k,
    const float* __restrict__ geo, T* __restrict__ y, float* __restrict__ lse, long long B,
    long long C, long long H, long long W, long long G, long long m, long long Ho, long long Wo,
    int comp) {
    lr_forward_in_slots<T, K, STRIDE, LR_PAIR_SLOTS>(x, q, k, geo, y, lse, B, C, H, W, G, m, Ho,
                                                      Wo, comp);
}

// lr_forward on small images (at most LR_SLOT_W x 2R outputs, R = lr_forward_strip): LR_SLOTS
// images per block (lr_forward_in_slots; over 48 KB of dynamic shared memory:
// cupy_backend.packed_shared_bytes).
template <typename T, int K, int STRIDE>
__global__ void __launch_bounds__(LR_THREADS, LR_MIN_BLOCKS) lr_forward_packed(
    const T* __restrict__ x, const T* __restrict__ q, const T* __restrict__ k,
    const float* __restrict__ geo, T* __restrict__ y, float* __restrict__ lse, long long B,
    long long C, long long H, long long W, long long G, long long m, long long Ho, long long Wo,
    int comp) {
    lr_forward_in_slots<T, K, STRIDE, LR_SLOTS>(x, q, k, geo, y, lse, B, C, H, W, G, m, Ho, Wo,
                                                 comp);
}

// Sum over the block of the K dlogits of one window column (s_row[a * LR_RED_PITCH + tid]), in
// a fixed order: 8 threads per offset sum 16 values each, then one thread per offset sums those
// 8 and adds the result to acc[a * STEP]. Every thread of the block calls it.
template <int K, int STEP>
__device__ __forceinline__ void lr_reduce_column(const float* __restrict__ s_row,
                                                 float* __restrict__ s_part,
                                                 float* __restrict__ acc, int tid) {
    static_assert(K * 8 <= LR_THREADS, "one column of offsets is reduced by 8 threads each");
    __syncthreads();  // the column is complete
    if (tid < K * 8) {
        const int r = tid / 8, part = tid % 8;
        float v = 0.0f;
#pragma unroll
        for (int e = 0; e < LR_THREADS / 8; ++e) v += s_row[r * LR_RED_PITCH + e * 8 + part];
        s_part[tid] = v;
    }
    __syncthreads();  // s_part is complete and s_row may be overwritten
    if (tid < K) {
        float v = 0.0f;
#pragma unroll
        for (int p = 0; p < 8; ++p) v += s_part[tid * 8 + p];
        acc[tid * STEP] += v;
    }
}

// lr_backward_query_packed's tile end: the key gradient of each slot's image positions (a
// BOX_H x BOX_W box of each of the SLOTS slots), summed over the copies of the slot's four thread
// rows that hold it in thread-row order and zeroed, goes to gk_partial in lr_backward_query's
// layout (the image's one tile of lr_query_shape, which lr_backward_input reads), for the slots
// that hold an image (b0 + z < B). The copies of the positions outside the images only ever
// receive zeros (weight 0) and are never read.
// lr_backward_query_pairs' (SLOTS = LR_PAIR_SLOTS) the same, its slots' eight thread rows
// (copy tr * 2 + z of thread row tr of slot z; packed: ((z / 2) * 4 + tr) * 2 + z % 2 of its four).
template <int K, int STRIDE, typename S>
__device__ __forceinline__ void lr_query_packed_partials(float* __restrict__ copies,
                                                         float* __restrict__ gk_partial,
                                                         long long B, long long b0, long long g,
                                                         long long G, long long H, long long W,
                                                         int tid) {
    using QS = lr_query_shape<K, STRIDE, lr_query_strip<K, STRIDE>()>;  // the partials' layout
    constexpr int P = K / 2, RS = S::R * STRIDE, BOX = S::BOX_H * S::BOX_W;
    constexpr bool PAIRS = S::SLOTS == LR_PAIR_SLOTS;
    constexpr int ROWS = PAIRS ? LR_TILE_H : 4;  // thread rows of a slot
    // the slot's thread rows top - j, j < NCOV, unrolled (each test a predicate), summed in
    // thread-row order; thread row rt's copy of (row, col) at a - (top - rt) * STEP (a slot's
    // consecutive thread rows lie two copies apart in both layouts)
    constexpr int NCOV = (S::NT + RS - 1) / RS, STEP = 2 * S::GS - RS * S::PW;
#pragma unroll 1
    for (int e = tid; e < S::SLOTS * BOX; e += LR_THREADS) {
        const int z = e / BOX, r = e % BOX / S::BOX_W, c = e % S::BOX_W;
        const int row = r + P, top = row / RS, below = row % RS;  // row = top * RS + below
        const int copy = PAIRS ? top * 2 + z : ((z / 2) * 4 + top) * 2 + z % 2;
        const int a = copy * S::GS + below * S::PW + lr_phase_col<S::IW, STRIDE>(c + P);
        float v = 0.0f;
#pragma unroll
        for (int j = NCOV - 1; j >= 0; --j) {  // copy of the slot's thread row top - j
            if (top - j >= 0 && top - j < ROWS && below + j * RS < S::NT) {
                v += copies[a - j * STEP];
                copies[a - j * STEP] = 0.0f;  // for the next tile
            }
        }
        const long long b = b0 + z;
        if (b < B && r < H && c < W) {
            gk_partial[(b * G + g) * (QS::IH * QS::IW) + row * QS::IW + (c + P)] = v;
        }
    }
}

// Backward, query side. Grid: G * nchunks blocks; block (g, chunk) takes the tiles chunk,
// chunk + nchunks, ... of group g's (b, tile) list; one thread per strip of R outputs. Per
// output it writes grad q; per tile the key gradient of its IH x IW staged positions,
// gk_partial[(((b * G + g) * tiles_h + th) * tiles_w + tw) * IH * IW + row * IW + col]
// (lr_backward_input sums the partials of each input); the block's sum of dlogit per window
// offset goes to geo_partial[(g * K * K + o) * nchunks + chunk].
//
// The key gradient: each window step adds its strip's sum of dlogit x dphi/dk into the copy of
// its thread row (LR_TILE_H copies of GS floats at the k tile's layout: s_gk, or where they do
// not fit shared memory the block's gk_work[blockIdx.x * LR_TILE_H * GS ...]). Within one window
// column a thread adds to NT distinct positions that no other thread of its row touches (its
// row's threads read other columns) and the other rows have their own copies, so there is no
// race; the next column's additions are ordered after by the barriers of the column's grad-geo
// reduction. At the end of the tile the copies are summed in thread-row order (and zeroed).
template <typename T, int K, int STRIDE, int COMP, int SLOTS>
__device__ __forceinline__ void lr_backward_query_tiles(
    const T* __restrict__ x, const T* __restrict__ q, const T* __restrict__ k,
    const float* __restrict__ geo, const float* __restrict__ lse, const T* __restrict__ y,
    const T* __restrict__ gy, T* __restrict__ gq, float* __restrict__ gk_partial,
    float* __restrict__ gk_work, float* __restrict__ geo_partial, long long B, long long C,
    long long H, long long W, long long G, long long m, long long Ho, long long Wo,
    long long nchunks, float* __restrict__ s_k, float* __restrict__ s_x,
    float* __restrict__ s_geo, float* __restrict__ s_row, float* __restrict__ s_part,
    float* __restrict__ s_gacc, float* __restrict__ s_gk) {
    constexpr bool PACKED = SLOTS > 1;  // several images a tile: packed or pairs
    constexpr bool PAIRS = SLOTS == LR_PAIR_SLOTS;
    using S = typename lr_pick<
        PAIRS, lr_query_pairs_shape<K, STRIDE>,
        typename lr_pick<PACKED, lr_query_packed_shape<K, STRIDE>,
                         lr_query_shape<K, STRIDE, lr_query_strip<K, STRIDE>()>>::type>::type;
    // thread rows of a slot over LR_TILE_H / 2
    constexpr int PASSES = PAIRS ? lr_query_pairs_shape<K, STRIDE>::PASSES : 1;
    constexpr int P = K / 2, KK = K * K, R = S::R, OTH = S::OTH, IH = S::IH, IW = S::IW;
    constexpr int PW = S::PW, TF = S::TF, NT = S::NT, L = S::L, MC = S::MC_QUERY;
    constexpr int V = S::V_QUERY;
    // copies[ty * STEP + s] is thread row ty's copy of staged index s (a row's strips start
    // RS staged rows, RS * PW floats, below the previous row's; its copy GS floats after it)
    constexpr int GS = S::GS, RS = R * STRIDE, STEP = GS - RS * PW;
    const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * LR_TILE_W + tx;
    // packed: this thread's slot (four thread rows each, two side by side) and its place in it;
    // pairs: its slot (a warp holds a thread row of each) and its thread row in each pass
    const int slot = PAIRS ? ty % 2 : (ty / 4) * 2 + tx / LR_SLOT_W;
    const int sx = PAIRS ? tx : tx % LR_SLOT_W, sy = PAIRS ? ty / 2 : ty % 4;
    // grid.x = G * nchunks < 2^31 (plan_backward_query), so both fit 32 bits (fewer registers)
    const int g = (int)(blockIdx.x / (unsigned)nchunks);
    const int chunk = (int)(blockIdx.x % (unsigned)nchunks);
    const long long tiles_w = PACKED ? 1 : (Wo + LR_TILE_W - 1) / LR_TILE_W;
    const long long tiles_h = PACKED ? 1 : (Ho + OTH - 1) / OTH;
    float* const copies =
        S::GK_SHARED ? s_gk : gk_work + (long long)blockIdx.x * (LR_TILE_H * GS);
    bool nan_prior;  // (the weights are recomputed from the saved lse: no bounded pass)
    const float bound = lr_stage_geo<KK>(s_geo, geo + (long long)g * KK, tid, nan_prior);
    lr_fill_each<KK>(s_gacc, 0.0f, tid);
    constexpr int NCOPIES = PACKED ? 2 * LR_TILE_H : LR_TILE_H;
    lr_fill_each<NCOPIES * GS>(copies, 0.0f, tid);
    if constexpr (PACKED) {  // what lies outside the images, once: the loads write the rest
        lr_fill_shared<TF>(s_k, LR_FAR_KEY, tid);
        lr_fill_shared<MC * TF>(s_x, 0.0f, tid);
    }
    const long long c_first = g * m;
    const int mg = (int)(c_first + m < C ? m : C - c_first);  // channels of group g (< 2^31)

    // of this group (packed: SLOTS images each)
    const long long ntiles = (PACKED ? (B + SLOTS - 1) / SLOTS : B) * tiles_h * tiles_w;
    for (unsigned tile = chunk; tile < (unsigned)ntiles; tile += (unsigned)nchunks) {
        // (group g's list: fewer than 2^31 tiles, lr_tile_of)
        const lr_tile_place place = lr_tile_of(tile, (unsigned)tiles_w, (unsigned)tiles_h, 1u);
        const long long tw = place.tw, th = place.th;
        const long long b0 = place.image * SLOTS;  // the tile's first image
        const long long b = PACKED ? b0 + slot : b0;
        const long long r0 = th * OTH * STRIDE - P, c0 = tw * LR_TILE_W * STRIDE - P;
        const long long qplane = (b * G + g) * Ho;
        const int slots = B - b0 < SLOTS ? (int)(B - b0) : SLOTS;  // slots holding an image

        __syncthreads();  // the previous tile is done with s_k, s_row, copies (s_geo, s_gacc set)
        if constexpr (PACKED) {  // (tiled: with the first chunk's channels, below)
            lr_load_slots<IH, IW, STRIDE, PW, 1, 1, SLOTS, S::SLOT, S::BOX_H, S::BOX_W>(
                s_k, 0, k + (b0 * G + g) * H * W, 0, 1, -P, -P, H, W, tid, G * H * W, slots);
        }
#pragma unroll
        for (int pass = 0; pass < PASSES; ++pass) {
            // this thread's row of its slot (packed: sy; pairs: four more each pass)
            const int vy = sy + pass * (LR_TILE_H / 2);
            const int base =
                PACKED ? slot * S::SLOT + vy * RS * PW + sx : ty * R * STRIDE * PW + tx;
            // staged index s of this thread: copies[gbase + s] (packed: one copy per thread row
            // and slot column, at its slot's staged positions; pairs: per thread row and slot)
            const int copy = PAIRS ? vy * 2 + slot : ty * 2 + tx / LR_SLOT_W;
            const int gbase =
                PACKED ? copy * GS - (slot * S::SLOT + vy * RS * PW) : ty * STEP;
            // (packed: opaque, or ptxas specialises the window loops on the small values and
            // spills)
            const long long i0 = PACKED ? lr_opaque((long long)vy * R) : th * OTH + ty * R;
            const long long j = PACKED ? lr_opaque((long long)sx) : tw * LR_TILE_W + tx;
            // uniform over the warp (packed: its first slot holds an image; pairs: its thread row,
            // the same in both slots, holds outputs)
            const bool warp_live = PAIRS    ? (long long)vy * R < Ho
                                   : PACKED ? b0 + (slot & ~1) < B
                                            : th * OTH + (ty & ~1) * R < Ho;
            if (!warp_live) {
                // wholly below the image: zeros for every column's grad-geo reduction (pairs: the
                // previous pass's last reduction is done with s_row)
#pragma unroll
                for (int a = 0; a < K; ++a) s_row[a * LR_RED_PITCH + tid] = 0.0f;
            }
            // output r exists iff r < outs
            const int outs = !PACKED || b < B ? lr_strip_outputs<R>(i0, j, Ho, Wo) : 0;
            // the strip's q, lse, grad q and its y, gy (channel c_first) from one address each,
            // at 32-bit offsets (a group's channel planes span fewer than 2^31 positions:
            // cupy_backend.offsets_fit)
            const int row = (int)Wo, plane = (int)(Ho * Wo);
            const long long strip_at = (qplane + i0) * Wo + j;
            const long long o_first = ((b * C + c_first) * Ho + i0) * Wo + j;
            const T* const y_strip = lr_opaque(y + o_first);
            const T* const gy_strip = lr_opaque(gy + o_first);
            // q scaled (lr_logit2); shift: (bound - lse) * log2(e), so p = 2^(l2 + shift) with
            // the forward's l2 = (l - bound) * log2(e)
            float qv[R], shift[R], gqv[R];
#pragma unroll
            for (int r = 0; r < R; ++r) {
                qv[r] = r < outs
                            ? lr_load(lr_opaque(q + strip_at), r * row) * lr_query_scale(COMP)
                            : 0.0f;
                // past the image's last row: -inf, so every weight of the output is 0 (but mul's)
                shift[r] = r < outs
                               ? (bound - lr_load(lr_opaque(lse + strip_at), r * row)) * LR_LOG2E
                               : __uint_as_float(0xff800000u);
                gqv[r] = 0.0f;
            }
            const lr_window<NT, K> win(i0 * STRIDE - P, j * STRIDE - P, H, W);
            for (int cg = 0; cg < mg; cg += MC) {  // chunk of channels c_first + cg + c, c < nc
                const int nc = mg - cg < MC ? mg - cg : MC;
                // everyone is done with the previous chunk in s_x (and the previous tile with s_k)
                __syncthreads();
                if (PAIRS && pass > 0 && mg <= MC) {
                    // (pairs: one chunk, staged in the first pass, serves both)
                } else if constexpr (PACKED) {
                    lr_load_slots<IH, IW, STRIDE, PW, MC, V, SLOTS, S::SLOT, S::BOX_H, S::BOX_W>(
                        s_x, TF, x + (b0 * C + c_first + cg) * H * W, H * W, nc, -P, -P, H, W, tid,
                        C * H * W, slots);
                } else {  // the first chunk copies the k tile too, each position worked out once
                    lr_load_phased<IH, IW, STRIDE, PW, MC, V>(
                        s_x, TF, x + (b * C + c_first + cg) * H * W, H * W, nc, r0, c0, H, W, tid,
                        0.0f, cg == 0 ? s_k : nullptr, k + (b * G + g) * H * W, LR_FAR_KEY);
                }
                __syncthreads();
                // gy of the chunk's channels and dsub, the chunk's share of the delta D = sum_c
                // gy_c y_c (from the saved output): dl = p (dw - D) is linear in both, so each
                // chunk subtracts its own channels' share
                float gyv[R][MC], dsub[R];
#pragma unroll
                for (int r = 0; r < R; ++r) {
                    dsub[r] = 0.0f;
#pragma unroll
                    for (int c = 0; c < MC; ++c) {
                        const bool in = r < outs && c < nc;
                        const int at = (cg + c) * plane + r * row;
                        gyv[r][c] = in ? lr_load(gy_strip, at) : 0.0f;
                        dsub[r] += gyv[r][c] * (in ? lr_load(y_strip, at) : 0.0f);
                    }
                }
                float gg[L];  // gg[d] = the strip's dlogit sum of window row t - d (this column)
                lr_strip_columns<NT, K, L, IW, STRIDE, PW>(
                    win, base, s_geo, warp_live,
                    [&](int t, int s, bool ok, const float* gw) {
                        // (the sums start from -0: -0 + v is v, no add)
                        if (t == 0) {
#pragma unroll
                            for (int d = 0; d < L; ++d) gg[d] = -0.0f;
                        }
                        lr_shift_in<L>(gg, -0.0f);
                        float xv[MC];
                        const float kv = lr_read_staged<MC, TF, V>(s_k, s_x, s, xv);
                        // the key gradient at s: the copy plus the strip's sum
                        float gkv = copies[gbase + s];
                        lr_strip_pairs<R, K, STRIDE>(t, [&](int r) {
                            // (outside the image: LR_FAR_KEY, p = 0, except mul)
                            const bool live = COMP != LR_MUL || (ok && r < outs);
                            const float l2 = lr_logit2(COMP, qv[r], kv, gw[r * STRIDE]);
                            const float p = live ? lr_exp2(l2 + shift[r]) : 0.0f;
                            float dw = -dsub[r];  // dw - dsub, the FFMAs from -dsub
#pragma unroll
                            for (int c = 0; c < MC; ++c) dw = fmaf(gyv[r][c], xv[c], dw);
                            const float dl = live ? p * dw : 0.0f;
                            // d phi / d k = -d phi / d q but for mul (in the units of lr_dphi2_dq:
                            // scaled by lr_query_grad_scale and lr_key_grad_scale after the sums);
                            // each sum one FFMA
                            const float dphi = lr_dphi2_dq(COMP, qv[r], kv);
                            gqv[r] = fmaf(dl, dphi, gqv[r]);
                            gkv = COMP == LR_MUL ? fmaf(dl, lr_dphi2_dk(COMP, qv[r], kv), gkv)
                                                 : fmaf(-dl, dphi, gkv);
                            gg[r * STRIDE] += dl;
                        });
                        copies[gbase + s] = gkv;
                        // window row t - (L - 1) has all its dlogits: no later strip row reaches it
                        const int done = t - (L - 1);
                        if (done >= 0) s_row[done * LR_RED_PITCH + tid] = gg[L - 1];
                    },
                    [&](int bb) { lr_reduce_column<K, K>(s_row, s_part, s_gacc + bb, tid); });
            }
#pragma unroll
            for (int r = 0; r < R; ++r) {
                if (r < outs) {
                    lr_store(lr_opaque(gq + strip_at), r * row, gqv[r] * lr_query_grad_scale(COMP));
                }
            }
        }  // pass
        // the copies are complete: the barriers of the last window column's grad-geo reduction
        // order every addition before this. Staged position (row, col) is read by the strips
        // of the thread rows rt with 0 <= row - rt * RS < NT, at copies[rt * STEP + slot].
        if constexpr (PACKED) {
            lr_query_packed_partials<K, STRIDE, S>(copies, gk_partial, B, b0, g, G, H, W, tid);
            continue;
        }
        float* const out = gk_partial + ((b * G + g) * tiles_h * tiles_w + th * tiles_w + tw) *
                                            (IH * IW);
        // the thread rows top - j, j < NCOV, unrolled (each test a predicate), summed in
        // thread-row order
        constexpr int NCOV = (NT + RS - 1) / RS;  // the most thread rows reading a staged row
#pragma unroll 1
        for (int e = tid; e < IH * IW; e += LR_THREADS) {
            const int row = e / IW, slot = row * PW + lr_phase_col<IW, STRIDE>(e % IW);
            const int top = row / RS, below = row % RS;  // row = top * RS + below
            const int at = top * STEP + slot;  // (thread row top's copy)
            float v = 0.0f;
#pragma unroll
            for (int j = NCOV - 1; j >= 0; --j) {
                // thread row top - j reads the row iff it exists and the row is one of its NT
                if (top - j >= 0 && top - j < LR_TILE_H && below + j * RS < NT) {
                    v += copies[at - j * STEP];
                    copies[at - j * STEP] = 0.0f;  // for the next tile
                }
            }
            out[e] = v;
        }
    }
    __syncthreads();  // s_gacc is complete
#pragma unroll
    for (int e0 = 0; e0 < KK; e0 += LR_THREADS) {  // (unrolled: lr_fill_each)
        const int e = e0 + tid;
        if (e < KK) geo_partial[((long long)g * KK + e) * nchunks + chunk] = s_gacc[e];
    }
}

// The tile body by layout (SLOTS images a tile: 1 or LR_SLOTS / 2), for LR_BY_COMPOSABILITY.
template <int SLOTS>
struct lr_backward_query_in {
    template <typename T, int K, int STRIDE, int COMP, typename... A>
    __device__ static __forceinline__ void run(A... args) {
        lr_backward_query_tiles<T, K, STRIDE, COMP, SLOTS>(args...);
    }
};

template <typename T, int K, int STRIDE>
__global__ void __launch_bounds__(LR_THREADS, LR_MIN_BLOCKS) lr_backward_query(
    const T* __restrict__ x, const T* __restrict__ q, const T* __restrict__ k,
    const float* __restrict__ geo, const float* __restrict__ lse, const T* __restrict__ y,
    const T* __restrict__ gy, T* __restrict__ gq, float* __restrict__ gk_partial,
    float* __restrict__ gk_work, float* __restrict__ geo_partial, long long B, long long C,
    long long H, long long W, long long G, long long m, long long Ho, long long Wo,
    long long nchunks, int comp) {
    using S = lr_query_shape<K, STRIDE, lr_query_strip<K, STRIDE>()>;
    // one array, so that every shared address is one base and a constant (separate arrays:
    // ptxas worked out each one's address again at every window column, 16 instructions)
    constexpr int GK = S::GK_SHARED ? LR_TILE_H * S::GS : 1;
    LR_SHARED_VECTORS(float, s_x, S::MC_QUERY * S::TF + S::TF + 2 * K * K + K * LR_RED_PITCH +
                                      K * 8 + GK);  // MC channel tiles, then the rest
    float* const s_k = s_x + S::MC_QUERY * S::TF;
    float* const s_geo = s_k + S::TF;
    float* const s_row = s_geo + K * K;
    float* const s_part = s_row + K * LR_RED_PITCH;
    float* const s_gacc = s_part + K * 8;  // the block's grad geo, accumulated in a fixed order
    float* const s_gk = s_gacc + K * K;    // the key-gradient copies
    LR_BY_COMPOSABILITY(comp, lr_backward_query_in<1>::template run, x, q, k, geo, lse, y, gy,
                        gq, gk_partial, gk_work, geo_partial, B, C, H, W, G, m, Ho, Wo, nchunks,
                        s_k, s_x, s_geo, s_row, s_part, s_gacc, s_gk)
}

// The body of lr_backward_query_packed and lr_backward_query_pairs: SLOTS images per block
// (lr_backward_query_tiles), all the shared arrays in dynamic shared memory (the shape's FLOATS;
// over 48 KB the launch opts in); the same grid and outputs as lr_backward_query (its grad-k
// partials in lr_backward_query's layout). Pairs run at stride 1 (other strides: an empty body,
// never launched).
template <typename T, int K, int STRIDE, int SLOTS>
__device__ __forceinline__ void lr_backward_query_in_slots(
    const T* __restrict__ x, const T* __restrict__ q, const T* __restrict__ k,
    const float* __restrict__ geo, const float* __restrict__ lse, const T* __restrict__ y,
    const T* __restrict__ gy, T* __restrict__ gq, float* __restrict__ gk_partial,
    float* __restrict__ gk_work, float* __restrict__ geo_partial, long long B, long long C,
    long long H, long long W, long long G, long long m, long long Ho, long long Wo,
    long long nchunks, int comp) {
    constexpr bool PAIRS = SLOTS == LR_PAIR_SLOTS;
    if constexpr (!PAIRS || STRIDE == 1) {
        using S = typename lr_pick<PAIRS, lr_query_pairs_shape<K, STRIDE>,
                                   lr_query_packed_shape<K, STRIDE>>::type;
        LR_DYNAMIC_SHARED(float, s_x);  // MC channel tiles, then the rest
        float* const s_k = s_x + S::MC_QUERY * S::TF;
        float* const s_gk = s_k + S::TF;  // the key-gradient copies
        float* const s_geo = s_gk + 2 * LR_TILE_H * S::GS;
        float* const s_gacc = s_geo + K * K;
        float* const s_row = s_gacc + K * K;
        float* const s_part = s_row + K * LR_RED_PITCH;
        LR_BY_COMPOSABILITY(comp, lr_backward_query_in<SLOTS>::template run, x, q, k, geo, lse,
                            y, gy, gq, gk_partial, gk_work, geo_partial, B, C, H, W, G, m, Ho,
                            Wo, nchunks, s_k, s_x, s_geo, s_row, s_part, s_gacc, s_gk)
    }
}

// lr_backward_query on small images (at most LR_SLOT_W x 4R outputs): LR_SLOTS / 2 images per
// block (lr_backward_query_in_slots; cupy_backend.packed_query_bytes).
template <typename T, int K, int STRIDE>
__global__ void __launch_bounds__(LR_THREADS, LR_MIN_BLOCKS) lr_backward_query_packed(
    const T* __restrict__ x, const T* __restrict__ q, const T* __restrict__ k,
    const float* __restrict__ geo, const float* __restrict__ lse, const T* __restrict__ y,
    const T* __restrict__ gy, T* __restrict__ gq, float* __restrict__ gk_partial,
    float* __restrict__ gk_work, float* __restrict__ geo_partial, long long B, long long C,
    long long H, long long W, long long G, long long m, long long Ho, long long Wo,
    long long nchunks, int comp) {
    lr_backward_query_in_slots<T, K, STRIDE, LR_SLOTS / 2>(x, q, k, geo, lse, y, gy, gq,
                                                          gk_partial, gk_work, geo_partial, B, C,
                                                          H, W, G, m, Ho, Wo, nchunks, comp);
}

// lr_backward_query on images of at most one tile (LR_TILE_W x LR_TILE_H R outputs) at stride
// 1: LR_PAIR_SLOTS images per block in two passes (lr_query_pairs_shape;
// cupy_backend.pairs_query_bytes).
template <typename T, int K, int STRIDE>
__global__ void __launch_bounds__(LR_THREADS, LR_MIN_BLOCKS) lr_backward_query_pairs(
    const T* __restrict__ x, const T* __restrict__ q, const T* __restrict__ k,
    const float* __restrict__ geo, const float* __restrict__ lse, const T* __restrict__ y,
    const T* __restrict__ gy, T* __restrict__ gq, float* __restrict__ gk_partial,
    float* __restrict__ gk_work, float* __restrict__ geo_partial, long long B, long long C,
    long long H, long long W, long long G, long long m, long long Ho, long long Wo,
    long long nchunks, int comp) {
    lr_backward_query_in_slots<T, K, STRIDE, LR_PAIR_SLOTS>(x, q, k, geo, lse, y, gy, gq,
                                                           gk_partial, gk_work, geo_partial, B, C,
                                                           H, W, G, m, Ho, Wo, nchunks, comp);
}

// grad k of a strip of RI inputs (hs + r, w), r < RI, of one (b, g) plane: for each input with
// live[r], the sum, in tile order, of lr_backward_query's partials (`partials`: that plane's,
// tiles_h x tiles_w tiles) of the tiles whose staged positions hold it; 0 for the others. The
// tile columns that staged column w are worked out once for the strip. In 32 bits: a plane, so
// its tile counts, holds fewer than 2^31 positions (cupy_backend.offsets_fit).
template <int K, int STRIDE, int RI>
__device__ __forceinline__ void lr_gather_key_grads(const float* __restrict__ partials, int hs,
                                                    int w, int tiles_h, int tiles_w,
                                                    const bool (&live)[RI], float (&v)[RI]) {
    using S = lr_query_shape<K, STRIDE, lr_query_strip<K, STRIDE>()>;
    constexpr int P = K / 2, IH = S::IH, IW = S::IW, TILE = IH * IW;
    constexpr int ROWS = S::OTH * STRIDE, COLS = LR_TILE_W * STRIDE;  // tile steps
    static_assert(IW <= 2 * COLS, "an input lies in at most two tile columns (K <= 17)");
    // tile (th, tw) stages input rows [th * ROWS - P, th * ROWS - P + IH), columns likewise:
    // column w lies in tile column tw_first, and in the next one where `both`
    const int tw_lo = lr_floor_div_int(w + P - IW, COLS) + 1;
    const int tw_first = tw_lo > 0 ? tw_lo : 0;
    const int tw_last = (w + P) / COLS < tiles_w - 1 ? (w + P) / COLS : tiles_w - 1;
    const bool both = tw_last > tw_first;
    // from (h, w) in tile (th, 0)'s frame to tile column tw_first's, and on to the next one's
    const long long first = (long long)tw_first * (TILE - COLS), next = TILE - COLS;
#pragma unroll
    for (int r = 0; r < RI; ++r) {
        v[r] = 0.0f;
        if (!live[r]) continue;
        const int h = hs + r;
        const int th_lo = lr_floor_div_int(h + P - IH, ROWS) + 1;
        const int th_last = (h + P) / ROWS < tiles_h - 1 ? (h + P) / ROWS : tiles_h - 1;
#pragma unroll 1
        for (int th = th_lo > 0 ? th_lo : 0; th <= th_last; ++th) {  // (one or two)
            const float* const at = partials + (long long)th * tiles_w * TILE +
                                    (h + P - th * ROWS) * IW + (w + P) + first;
            v[r] += at[0];
            if (both) v[r] += at[next];
        }
    }
}

// Backward, input side: one thread per strip of RI input positions (hs + r, wc), r < RI, of a
// tile of one (b, g) plane. It gathers grad x for the channels of group g at those positions
// from the outputs whose windows cover them: output rows i_first + t, t < NT (each covers the
// strip rows r with 0 <= hs + r + P - i * STRIDE < K), columns j_first + tj, tj < NC; and
// grad k from lr_backward_query's partials (lr_gather_key_grads). Shared: q and lse over the
// outputs covering the tile, staged as lr_backward_query uses them (q scaled by
// lr_query_scale, and the weights' shift (bound - lse) log2(e) in place of lse), and gy of MC
// channels over the same outputs.
template <typename T, int K, int STRIDE, int COMP, int SLOTS>
__device__ __forceinline__ void lr_backward_input_tiles(
    const T* __restrict__ q, const T* __restrict__ k, const float* __restrict__ geo,
    const float* __restrict__ lse, const T* __restrict__ gy,
    const float* __restrict__ gk_partial, T* __restrict__ gx, T* __restrict__ gk, long long B,
    long long C, long long H, long long W, long long G, long long m, long long Ho, long long Wo,
    float* __restrict__ s_q, float* __restrict__ s_shift, float* __restrict__ s_gy,
    float* __restrict__ s_geo) {
    using S = lr_input_shape<K, STRIDE, SLOTS>;
    using QS = lr_query_shape<K, STRIDE, lr_query_strip<K, STRIDE>()>;
    constexpr int P = K / 2, KK = K * K, RI = S::RI, ITH = S::ITH, NC = S::NC, NT = S::NT;
    constexpr int OH = S::OH, OW = S::OW, PO = S::PO, TO = S::TO, MC = S::MC, V = S::V;
    constexpr bool PACKED = SLOTS > 1;
    const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * LR_TILE_W + tx;
    // packed: this thread's slot and its place in the slot (as in lr_forward_tiles)
    const int slot = lr_slot_of<SLOTS>(tx, ty);
    const int sx = tx % lr_slot_cols<SLOTS>(), sy = ty % lr_slot_rows<SLOTS>();
    const long long tiles_w = PACKED ? 1 : (W + LR_TILE_W - 1) / LR_TILE_W;
    const long long tiles_h = PACKED ? 1 : (H + ITH - 1) / ITH;
    const long long images = PACKED ? (B + SLOTS - 1) / SLOTS : B;  // per group, per tile
    // lr_backward_query's tiles per (b, g) plane, and the floats of their grad-k partials
    const long long query_tiles_h = (Ho + QS::OTH - 1) / QS::OTH;
    const long long query_tiles_w = (Wo + LR_TILE_W - 1) / LR_TILE_W;
    const long long plane_partials = query_tiles_h * query_tiles_w * (QS::IH * QS::IW);

    if constexpr (PACKED) {  // what lies outside the images, once: the loads write the rest
        lr_fill_shared<TO>(s_q, 0.0f, tid);
        lr_fill_shared<TO>(s_shift, __uint_as_float(0xff800000u), tid);  // shift -inf
        lr_fill_shared<MC * TO>(s_gy, 0.0f, tid);
    }
    // images * G * tiles_h * tiles_w tiles (fewer than 2^31: lr_tile_of)
    const unsigned ntiles = (unsigned)(images * G * tiles_h * tiles_w);
    for (unsigned tile = blockIdx.x; tile < ntiles; tile += gridDim.x) {
        const lr_tile_place place = lr_tile_of(tile, (unsigned)tiles_w, (unsigned)tiles_h,
                                               (unsigned)G);
        const long long tw = place.tw, th = place.th, g = place.g;
        const long long b0 = place.image * SLOTS;  // the tile's first image
        const long long b = PACKED ? b0 + slot : b0;
        const long long h0 = th * ITH, w0 = tw * LR_TILE_W;
        // (packed: opaque, or ptxas specialises the window loops on the small values and spills)
        const long long hs = PACKED ? lr_opaque((long long)sy * RI) : h0 + ty * RI;
        const long long wc = PACKED ? lr_opaque((long long)sx) : w0 + tx;
        // uniform over the warp (packed: its first slot holds an image)
        const bool warp_live =
            PACKED ? b0 + lr_warp_first_slot<SLOTS>(slot) < B : h0 + (ty & ~1) * RI < H;
        const int slots = B - b0 < SLOTS ? (int)(B - b0) : SLOTS;  // slots holding an image
        // first output row / column whose window can cover the tile
        const long long oi0 = lr_floor_div(h0 + P - K + STRIDE, STRIDE);
        const long long oj0 = lr_floor_div(w0 + P - K + STRIDE, STRIDE);
        const long long plane = (b * G + g) * Ho * Wo;

        __syncthreads();
        bool nan_prior;  // (the weights are recomputed from the saved lse: no bounded pass)
        const float bound = lr_stage_geo<KK>(s_geo, geo + g * KK, tid, nan_prior);
        // staged: q scaled, q2 = (0 - q) * -lr_query_scale, and shift = (bound - lse) log2(e),
        // so p = 2^(l2 + shift) (lr_backward_query's). An output outside the image: lse
        // LR_FAR_KEY (packed: shift -inf), so its weights are exactly 0 (and its gy is staged
        // as 0)
        const lr_rescale scaled_q = {0.0f, -lr_query_scale(COMP)};
        const lr_rescale shift_of_lse = {bound, LR_LOG2E};
        if constexpr (PACKED) {
            const long long first = (b0 * G + g) * Ho * Wo;
            lr_load_slots<OH, OW, 1, PO, 1, 1, SLOTS, S::SLOT, S::BOX_H, S::BOX_W, false, true>(
                s_q, 0, q + first, 0, 1, S::OI0, S::OI0, Ho, Wo, tid, G * Ho * Wo, slots,
                scaled_q);
            lr_load_slots<OH, OW, 1, PO, 1, 1, SLOTS, S::SLOT, S::BOX_H, S::BOX_W, false, true>(
                s_shift, 0, lse + first, 0, 1, S::OI0, S::OI0, Ho, Wo, tid, G * Ho * Wo, slots,
                shift_of_lse);
        } else {
            lr_load_tile<OH, OW, PO, 1, 1, true>(s_q, 0, q + plane, 0, 1, oi0, oj0, Ho, Wo, tid,
                                                 0.0f, scaled_q);
            lr_load_tile<OH, OW, PO, 1, 1, true>(s_shift, 0, lse + plane, 0, 1, oi0, oj0, Ho,
                                                 Wo, tid, LR_FAR_KEY, shift_of_lse);
        }

        // the outputs covering the strip: i = i_first + t, j = j_first + tj
        const long long i_first = lr_floor_div(hs + P - K + STRIDE, STRIDE);
        const long long j_first = lr_floor_div(wc + P - K + STRIDE, STRIDE);
        const int sbase =
            (int)((i_first - oi0) * PO + (j_first - oj0)) + (PACKED ? slot * S::SLOT : 0);
        // row offset of (t, r) = (0, 0) and column offset of tj = 0 (K - 1 at stride 1)
        const int a_first = STRIDE == 1 ? K - 1 : (int)(hs + P - i_first * STRIDE);
        const int b_first = STRIDE == 1 ? K - 1 : (int)(wc + P - j_first * STRIDE);
        // the covering outputs that exist: bit t of out_rows (row i_first + t), bit tj of
        // out_cols (column j_first + tj)
        // (in 32 bits, one unsigned test each: a plane holds fewer than 2^31 positions,
        // cupy_backend.offsets_fit)
        unsigned out_rows = 0, out_cols = 0;
        const int i_first32 = (int)i_first, j_first32 = (int)j_first;
#pragma unroll
        for (int t = 0; t < NT; ++t) {
            if ((unsigned)(i_first32 + t) < (unsigned)Ho) out_rows |= 1u << t;
        }
#pragma unroll
        for (int tj = 0; tj < NC; ++tj) {
            if ((unsigned)(j_first32 + tj) < (unsigned)Wo) out_cols |= 1u << tj;
        }
        bool in_ok[RI];
        float kv[RI];
        // the strip's k and grad k from one address each, at 32-bit offsets (a group's channel
        // planes span fewer than 2^31 positions: cupy_backend.offsets_fit)
        const int row = (int)W;
        const long long strip_at = ((b * G + g) * H + hs) * W + wc;
        const T* const k_strip = lr_opaque(k + strip_at);
        // bit t of pair_rows[r]: output row i_first + t exists, its window covers strip row r
        // (window row a_first + r - t * STRIDE in [0, K)) and input r exists
        unsigned pair_rows[RI];
#pragma unroll
        for (int r = 0; r < RI; ++r) {
            in_ok[r] = hs + r < H && wc < W && (!PACKED || b < B);
            kv[r] = in_ok[r] ? lr_load(k_strip, r * row) : 0.0f;
            pair_rows[r] = 0;
#pragma unroll
            for (int t = 0; t < NT; ++t) {
                const int a = a_first + r - t * STRIDE;
                if (a >= 0 && a < K) pair_rows[r] |= 1u << t;
            }
            pair_rows[r] = in_ok[r] ? pair_rows[r] & out_rows : 0u;
        }
        const long long c_first = g * m;
        const long long c_end = c_first + m < C ? c_first + m : C;
        for (long long cc = c_first; cc < c_end; cc += MC) {
            const int nc = c_end - cc < MC ? (int)(c_end - cc) : MC;
            __syncthreads();  // everyone is done with the previous chunk in s_gy
            if constexpr (PACKED) {
                lr_load_slots<OH, OW, 1, PO, MC, V, SLOTS, S::SLOT, S::BOX_H, S::BOX_W, false>(
                    s_gy, TO, gy + (b0 * C + cc) * Ho * Wo, Ho * Wo, nc, S::OI0, S::OI0, Ho, Wo,
                    tid, C * Ho * Wo, slots);
            } else {
                lr_load_tile<OH, OW, PO, MC, V>(s_gy, TO, gy + (b * C + cc) * Ho * Wo, Ho * Wo,
                                                nc, oi0, oj0, Ho, Wo, tid);
            }
            __syncthreads();
            float gxv[RI][MC];
#pragma unroll
            for (int r = 0; r < RI; ++r) {
#pragma unroll
                for (int c = 0; c < MC; ++c) gxv[r][c] = 0.0f;
            }
            // Output rows unrolled (t a constant). At stride 1 every window column of the loop is
            // in range and the pairs (r, t) are those with 0 <= t - r < K, known at compile time;
            // an output outside the image has weight 0 by its staged lse and an input outside it
            // is not stored: no test. At larger strides the pairs are tested (pair_rows).
            if (warp_live) {
#pragma unroll 1
                for (int tj = 0; tj < NC; ++tj) {
                    const int bb = b_first - tj * STRIDE;  // window column of wc in j_first + tj
                    const bool col_ok = ((out_cols >> tj) & 1u) && bb >= 0;
                    unsigned col_rows[RI];  // pair_rows of this column (none where it is out)
#pragma unroll
                    for (int r = 0; r < RI; ++r) col_rows[r] = col_ok ? pair_rows[r] : 0u;
#pragma unroll
                    for (int t = 0; t < NT; ++t) {
                        const int s = sbase + t * PO + tj;
                        const int o_first = (a_first - t * STRIDE) * K + bb;  // geo of r = 0
                        // q scaled and p = 2^(l2 + shift), as in lr_backward_query
                        const float qv = s_q[s], shift = s_shift[s];
                        float gyc[MC];
                        lr_read_channels<MC, TO, V>(s_gy, s, gyc);  // 0 past nc
#pragma unroll
                        for (int r = 0; r < RI; ++r) {
                            // window row a_first + r - t * STRIDE of hs + r in output row t
                            if (STRIDE == 1 && (t < r || t - r >= K)) continue;
                            const bool ok = STRIDE == 1 || ((col_rows[r] >> t) & 1u);
                            const int o = ok ? o_first + r * K : 0;
                            const float l2 = lr_logit2(COMP, qv, kv[r], s_geo[o]);
                            const float e = lr_exp2(l2 + shift);
                            const float wt = ok ? e : 0.0f;
#pragma unroll
                            for (int c = 0; c < MC; ++c) gxv[r][c] += wt * gyc[c];
                        }
                    }
                }
            }
            // the strip's grad x, one pointer per input row stepped a channel plane at a time
            // (a group's channel planes span fewer than 2^31 positions:
            // cupy_backend.offsets_fit), each store predicated on its channel (c < nc: a
            // ragged chunk's last channels are not stored). The pointers are worked out per
            // row (lr_opaque): held across the rows, offsets spilled in the 16-bit sm_80 builds.
            T* const gx_strip = gx + ((b * C + cc) * H + hs) * W + wc;
            const int in_plane = (int)(H * W);
#pragma unroll
            for (int r = 0; r < RI; ++r) {
                if (!in_ok[r]) continue;
                T* at = lr_opaque(gx_strip + r * row);
#pragma unroll
                for (int c = 0; c < MC; ++c) {
                    if (c < nc) lr_store(at, 0, gxv[r][c]);
                    at += in_plane;
                }
            }
        }
        float gkv[RI];
        lr_gather_key_grads<K, STRIDE, RI>(gk_partial + (b * G + g) * plane_partials, (int)hs,
                                           (int)wc, (int)query_tiles_h, (int)query_tiles_w,
                                           in_ok, gkv);
#pragma unroll
        for (int r = 0; r < RI; ++r) {
            if (in_ok[r]) {
                lr_store(lr_opaque(gk + strip_at), r * row, gkv[r] * lr_key_grad_scale(COMP));
            }
        }
    }
}

// The tile body by layout (SLOTS images a tile: 1, LR_PAIR_SLOTS or LR_SLOTS), for
// LR_BY_COMPOSABILITY.
template <int SLOTS>
struct lr_backward_input_in {
    template <typename T, int K, int STRIDE, int COMP, typename... A>
    __device__ static __forceinline__ void run(A... args) {
        lr_backward_input_tiles<T, K, STRIDE, COMP, SLOTS>(args...);
    }
};

// The body of lr_backward_input_pairs and lr_backward_input_packed: SLOTS images per block at
// stride 1 (other strides: an empty body, never launched), the tiles in dynamic shared memory
// (lr_input_shape's FLOATS: the MC gy tiles, then q, shift and geo; over 48 KB the launch opts
// in).
template <typename T, int K, int STRIDE, int SLOTS>
__device__ __forceinline__ void lr_backward_input_in_slots(
    const T* __restrict__ q, const T* __restrict__ k, const float* __restrict__ geo,
    const float* __restrict__ lse, const T* __restrict__ gy,
    const float* __restrict__ gk_partial, T* __restrict__ gx, T* __restrict__ gk, long long B,
    long long C, long long H, long long W, long long G, long long m, long long Ho, long long Wo,
    int comp) {
    if constexpr (STRIDE == 1) {
        using S = lr_input_shape<K, STRIDE, SLOTS>;
        LR_DYNAMIC_SHARED(float, s_gy);
        float* const s_q = s_gy + S::MC * S::TO;
        float* const s_shift = s_q + S::TO;
        float* const s_geo = s_shift + S::TO;
        LR_BY_COMPOSABILITY(comp, lr_backward_input_in<SLOTS>::template run, q, k, geo, lse, gy,
                            gk_partial, gx, gk, B, C, H, W, G, m, Ho, Wo, s_q, s_shift, s_gy,
                            s_geo)
    }
}

template <typename T, int K, int STRIDE>
__global__ void __launch_bounds__(LR_THREADS, LR_MIN_BLOCKS) lr_backward_input(
    const T* __restrict__ q, const T* __restrict__ k, const float* __restrict__ geo,
    const float* __restrict__ lse, const T* __restrict__ gy,
    const float* __restrict__ gk_partial, T* __restrict__ gx, T* __restrict__ gk, long long B,
    long long C, long long H, long long W, long long G, long long m, long long Ho, long long Wo,
    int comp) {
    using S = lr_input_shape<K, STRIDE>;
    // the MC gy tiles (first: 16-byte aligned for lr_read_channels), q, shift and geo in one
    // array: the window loop reads them at one address plus constant offsets
    LR_SHARED_VECTORS(float, s_out, (2 + S::MC) * S::TO + K * K);
    float* const s_gy = s_out;
    float* const s_q = s_out + S::MC * S::TO;
    float* const s_shift = s_q + S::TO;
    float* const s_geo = s_shift + S::TO;
    LR_BY_COMPOSABILITY(comp, lr_backward_input_in<1>::template run, q, k, geo, lse, gy,
                        gk_partial, gx, gk, B, C, H, W, G, m, Ho, Wo, s_q, s_shift, s_gy, s_geo)
}

// lr_backward_input on small images at stride 1 (at most LR_SLOT_W x 2 RI inputs): LR_SLOTS
// images per block (lr_backward_input_in_slots; over 48 KB of dynamic shared memory:
// cupy_backend.packed_input_bytes).
template <typename T, int K, int STRIDE>
__global__ void __launch_bounds__(LR_THREADS, LR_MIN_BLOCKS) lr_backward_input_packed(
    const T* __restrict__ q, const T* __restrict__ k, const float* __restrict__ geo,
    const float* __restrict__ lse, const T* __restrict__ gy,
    const float* __restrict__ gk_partial, T* __restrict__ gx, T* __restrict__ gk, long long B,
    long long C, long long H, long long W, long long G, long long m, long long Ho, long long Wo,
    int comp) {
    lr_backward_input_in_slots<T, K, STRIDE, LR_SLOTS>(q, k, geo, lse, gy, gk_partial, gx, gk, B,
                                                        C, H, W, G, m, Ho, Wo, comp);
}

// lr_backward_input on images of at most LR_TILE_W x (LR_TILE_H / 2) RI inputs at stride 1:
// LR_PAIR_SLOTS images per block (lr_backward_input_in_slots; over 48 KB of dynamic shared
// memory at K >= 7: cupy_backend.pairs_input_bytes), every warp on one of them.
template <typename T, int K, int STRIDE>
__global__ void __launch_bounds__(LR_THREADS, LR_MIN_BLOCKS) lr_backward_input_pairs(
    const T* __restrict__ q, const T* __restrict__ k, const float* __restrict__ geo,
    const float* __restrict__ lse, const T* __restrict__ gy,
    const float* __restrict__ gk_partial, T* __restrict__ gx, T* __restrict__ gk, long long B,
    long long C, long long H, long long W, long long G, long long m, long long Ho, long long Wo,
    int comp) {
    lr_backward_input_in_slots<T, K, STRIDE, LR_PAIR_SLOTS>(q, k, geo, lse, gy, gk_partial, gx, gk,
                                                             B, C, H, W, G, m, Ho, Wo, comp);
}
