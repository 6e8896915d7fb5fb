// Native pieces of the integer linear on AVX-512 (VNNI): the exact int8 GEMV for small M, the
// exact activation quantizers (npu_dynamic_quant per token, npu_quantize per tensor) and the
// float32 epilogues with their rounding to the model dtype, each matching the torch path bit
// for bit. Built and loaded by optimized/vnni_gemv.py (g++, ctypes); see there for the contract.
// The weight is read where oneDNN keeps it: the buffer torch.ops.onednn.qlinear_prepack made
// (its AVX-512 VNNI blocked format, verified byte for byte against the checkpoint weight
// before this code is ever given it):
//
//     byte ((b * KG + g) * 64 + j) * 4 + i  =  w[64 b + j, 4 g + i]      (zero where padded)
//
// for output block b of 64 columns, k-group g of 4, KG = Kp / 4. One vpdpbusd multiplies 4
// unsigned activation bytes (broadcast) by 4 signed weight bytes for 16 columns and adds the
// four products to 16 int32 lanes. Activations enter as u = q + 128 (0..255); the exact sum is
// sum(u w) - 128 colsum(w). Every partial sum stays in int32: |sum(u w)| <= 255 * 128 * Kp
// < 2^31 for Kp <= 65536 (checked by the caller). The int32 -> float32 conversion is
// vcvtdq2ps under the default MXCSR (round to nearest even), i.e. f32(acc), and the optional
// column scale is one float32 multiply: f32(f32(acc) * scale[n]), as the reference.

#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmath>

namespace {

constexpr int64_t kBlockN = 64;

inline __mmask16 tail_mask(int64_t n0, int64_t n) {
    if (n0 + 16 <= n) return 0xFFFF;
    if (n0 >= n) return 0;
    return (__mmask16)((1u << (n - n0)) - 1u);
}

// Epilogue operands: out = f32(acc) [* scale[n]] [* row_scale[r]] [+ bias[n]], each a
// separately rounded float32 operation (built with -ffp-contract=off: no fused multiply-add).
struct Epilogue {
    const int32_t* colsum128;
    const float* scale;      // [N] or NULL
    const float* row_scale;  // [M] (offset to the block's first row) or NULL
    const float* bias;       // [N] or NULL
};

template <int MR>
void block_rows(const uint8_t* xu, int64_t ldx, const int8_t* wb, int64_t kg, const Epilogue& e,
                float* out, int64_t ldo, int64_t n0, int64_t n) {
    __m512i c[MR][4];
    for (int r = 0; r < MR; ++r)
        for (int j = 0; j < 4; ++j) c[r][j] = _mm512_setzero_si512();
    for (int64_t g = 0; g < kg; ++g) {
        const int8_t* p = wb + g * 256;
        _mm_prefetch((const char*)(p + 2048), _MM_HINT_T0);
        _mm_prefetch((const char*)(p + 2048 + 64), _MM_HINT_T0);
        _mm_prefetch((const char*)(p + 2048 + 128), _MM_HINT_T0);
        _mm_prefetch((const char*)(p + 2048 + 192), _MM_HINT_T0);
        const __m512i w0 = _mm512_loadu_si512((const void*)p);
        const __m512i w1 = _mm512_loadu_si512((const void*)(p + 64));
        const __m512i w2 = _mm512_loadu_si512((const void*)(p + 128));
        const __m512i w3 = _mm512_loadu_si512((const void*)(p + 192));
        for (int r = 0; r < MR; ++r) {
            int32_t a4;
            memcpy(&a4, xu + r * ldx + 4 * g, 4);
            const __m512i a = _mm512_set1_epi32(a4);
            c[r][0] = _mm512_dpbusd_epi32(c[r][0], a, w0);
            c[r][1] = _mm512_dpbusd_epi32(c[r][1], a, w1);
            c[r][2] = _mm512_dpbusd_epi32(c[r][2], a, w2);
            c[r][3] = _mm512_dpbusd_epi32(c[r][3], a, w3);
        }
    }
    for (int j = 0; j < 4; ++j) {
        const int64_t nj = n0 + 16 * j;
        const __mmask16 mask = tail_mask(nj, n);
        if (!mask) break;
        const __m512i comp = _mm512_loadu_si512((const void*)(e.colsum128 + nj));  // padded to Np
        __m512 s = _mm512_set1_ps(1.0f), bias = _mm512_setzero_ps();
        if (e.scale) s = _mm512_maskz_loadu_ps(mask, e.scale + nj);
        if (e.bias) bias = _mm512_maskz_loadu_ps(mask, e.bias + nj);
        for (int r = 0; r < MR; ++r) {
            __m512 f = _mm512_cvtepi32_ps(_mm512_sub_epi32(c[r][j], comp));
            if (e.scale) f = _mm512_mul_ps(f, s);
            if (e.row_scale) f = _mm512_mul_ps(f, _mm512_set1_ps(e.row_scale[r]));
            if (e.bias) f = _mm512_add_ps(f, bias);
            _mm512_mask_storeu_ps(out + r * ldo + nj, mask, f);
        }
    }
}

void run_blocks(const uint8_t* xu, int64_t m, int64_t kp, const int8_t* w, int64_t np_, int64_t n,
                const Epilogue& e, float* out, int nthreads) {
    const int64_t nblocks = np_ / kBlockN, kg = kp / 4;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t b = 0; b < nblocks; ++b) {
        const int8_t* wb = w + b * kBlockN * kp;
        const int64_t n0 = b * kBlockN;
        int64_t r = 0;
        Epilogue er = e;
        for (; r + 4 <= m; r += 4) {
            er.row_scale = e.row_scale ? e.row_scale + r : nullptr;
            block_rows<4>(xu + r * kp, kp, wb, kg, er, out + r * n, n, n0, n);
        }
        er.row_scale = e.row_scale ? e.row_scale + r : nullptr;
        switch (m - r) {
            case 3: block_rows<3>(xu + r * kp, kp, wb, kg, er, out + r * n, n, n0, n); break;
            case 2: block_rows<2>(xu + r * kp, kp, wb, kg, er, out + r * n, n, n0, n); break;
            case 1: block_rows<1>(xu + r * kp, kp, wb, kg, er, out + r * n, n, n0, n); break;
            default: break;
        }
    }
}

uint8_t* scratch(int64_t m, int64_t kp) {
    return (uint8_t*)aligned_alloc(64, (size_t)(((m * kp) + 63) / 64 * 64));
}

// Row r of x as float32 (exact conversions) into xf[0 .. k).
void row_to_f32(const void* x, int dtype, int64_t r, int64_t k, float* xf) {
    if (dtype == 0) {
        memcpy(xf, (const float*)x + r * k, (size_t)k * 4);
        return;
    }
    const uint16_t* h = (const uint16_t*)x + r * k;
    int64_t i = 0;
    for (; i + 16 <= k; i += 16) {
        const __m256i v = _mm256_loadu_si256((const __m256i*)(h + i));
        const __m512 f = dtype == 1
            ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16))   // bfloat16
            : _mm512_cvtph_ps(v);                                                      // float16
        _mm512_storeu_ps(xf + i, f);
    }
    for (; i < k; ++i) {
        if (dtype == 1) {
            const uint32_t u = (uint32_t)h[i] << 16;
            memcpy(xf + i, &u, 4);
        } else {
            xf[i] = _cvtsh_ss(h[i]);
        }
    }
}

// npu_dynamic_quant of one float32 row into u = q + 128 (padded with 128 up to kp).
// Returns false (nothing written) unless max|x| is finite and > 0 and qmax / max is finite.
bool quant_row(const float* xf, int64_t k, int64_t kp, float qmax, uint8_t* dst, float* s_tok) {
    __m512 vmax = _mm512_setzero_ps();
    __mmask16 nan = 0;
    int64_t i = 0;
    for (; i < k; i += 16) {   // masked-off lanes load 0: |0| never raises the maximum
        const __m512 a = _mm512_abs_ps(_mm512_maskz_loadu_ps(tail_mask(i, k), xf + i));
        nan |= _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q);
        vmax = _mm512_max_ps(vmax, a);
    }
    const float mx = _mm512_reduce_max_ps(vmax);
    const float rr = qmax / mx;                                   // IEEE division
    if (nan || !(mx > 0.0f) || !std::isfinite(mx) || !std::isfinite(rr)) return false;
    const __m512 vr = _mm512_set1_ps(rr), hi = _mm512_set1_ps(qmax), lo = _mm512_set1_ps(-qmax);
    const __m512i off = _mm512_set1_epi32(128);
    for (i = 0; i < k; i += 16) {
        const __mmask16 t = tail_mask(i, k);
        __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(t, xf + i), vr);
        v = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);   // RNE
        v = _mm512_min_ps(_mm512_max_ps(v, lo), hi);
        const __m512i u = _mm512_add_epi32(_mm512_cvtps_epi32(v), off);             // exact ints
        _mm_mask_storeu_epi8(dst + i, t, _mm512_cvtepi32_epi8(u));
    }
    for (i = k; i < kp; ++i) dst[i] = 0x80u;
    *s_tok = mx / qmax;                                           // IEEE division
    return true;
}

// Store v (masked) at out[idx] as odtype: 0 float32, 1 bfloat16, 2 float16, rounding to nearest
// even (torch's .to(dtype) for every non-NaN value; inf stays inf, overflow becomes inf).
inline void store_as(__m512 v, int odtype, void* out, int64_t idx, __mmask16 mk) {
    if (odtype == 0) {
        _mm512_mask_storeu_ps((float*)out + idx, mk, v);
        return;
    }
    __m256i h;
    if (odtype == 1) {  // bits + 0x7FFF + lsb, >> 16
        const __m512i b = _mm512_castps_si512(v);
        const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
        const __m512i rb = _mm512_add_epi32(_mm512_add_epi32(b, _mm512_set1_epi32(0x7FFF)), lsb);
        h = _mm512_cvtepi32_epi16(_mm512_srli_epi32(rb, 16));
    } else {
        h = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    }
    _mm256_mask_storeu_epi16((uint16_t*)out + idx, mk, h);
}

}  // namespace

extern "C" {

// q [M, K] int8 (row-major), w: the blocked buffer (Np / 64 blocks of Kp * 64 bytes),
// colsum128 [Np] int32 = 128 * sum_k w[n, k] (zero for padded n), scale [N] float32 or NULL,
// out [M, N] float32 = f32(acc) [* scale]. Returns 0, or -1 if the scratch cannot be allocated.
// is_u8: q already holds u = q + 128 (uint8), as aq_quant_static_u8 writes it.
int aq_vnni_gemv(const int8_t* q, int64_t m, int64_t k, const int8_t* w, int64_t kp, int64_t np_,
                 int64_t n, const int32_t* colsum128, const float* scale, float* out, int nthreads,
                 int is_u8) {
    if (m <= 0) return 0;
    uint8_t* xu = scratch(m, kp);
    if (!xu) return -1;
    const uint8_t flip = is_u8 ? 0u : 0x80u;
    for (int64_t r = 0; r < m; ++r) {
        const uint8_t* src = (const uint8_t*)(q + r * k);
        uint8_t* dst = xu + r * kp;
        for (int64_t i = 0; i < k; ++i) dst[i] = (uint8_t)(src[i] ^ flip);     // q + 128
        for (int64_t i = k; i < kp; ++i) dst[i] = 0x80u;                     // code 0
    }
    Epilogue e{colsum128, scale, nullptr, nullptr};
    run_blocks(xu, m, kp, w, np_, n, e, out, nthreads);
    free(xu);
    return 0;
}

// The per-token linear in one call: x [M, K] (dtype 0 float32, 1 bfloat16, 2 float16) is
// quantized as npu_dynamic_quant does -- m = max|f32(x)|, r = f32(qmax) / m (IEEE division),
// q = clamp(rint(f32(x) * r), -qmax, qmax), s_tok = m / f32(qmax) -- then
// out = f32(f32(f32(acc) * scale[n]) * s_tok[m]) [+ bias[n]]  (float32 [M, N]).
// Only rows with a finite m > 0 and a finite r are handled: if any row is not (zero, NaN,
// inf, or a maximum so small that r overflows), nothing is computed and 1 is returned, and
// the caller takes its general path. Returns 0 on success, -1 if scratch allocation fails.
int aq_pertoken_gemv(const void* x, int dtype, int64_t m, int64_t k, float qmax, const int8_t* w,
                     int64_t kp, int64_t np_, int64_t n, const int32_t* colsum128, const float* scale,
                     const float* bias, float* out, float* s_tok, int nthreads) {
    if (m <= 0) return 0;
    uint8_t* xu = scratch(m, kp);
    if (!xu) return -1;
    float* xf = (float*)aligned_alloc(64, (size_t)((k * 4 + 63) / 64 * 64));
    if (!xf) {
        free(xu);
        return -1;
    }
    for (int64_t r = 0; r < m; ++r) {
        row_to_f32(x, dtype, r, k, xf);
        if (!quant_row(xf, k, kp, qmax, xu + r * kp, s_tok + r)) {
            free(xf);
            free(xu);
            return 1;
        }
    }
    free(xf);
    Epilogue e{colsum128, scale, s_tok, bias};
    run_blocks(xu, m, kp, w, np_, n, e, out, nthreads);
    free(xu);
    return 0;
}

// npu_dynamic_quant of every row of x [M, K] (dtype as above) into u = q + 128 (uint8
// [M, K], the unsigned form oneDNN's VNNI matmul takes) and s_tok [M]. Returns 1 (outputs
// unspecified) if any row is zero, non-finite or has qmax / max overflowing, else 0;
// -1 if scratch allocation fails. Rows are spread over nthreads threads.
int aq_quant_pertoken_u8(const void* x, int dtype, int64_t m, int64_t k, float qmax, uint8_t* u,
                         float* s_tok, int nthreads) {
    int bad = 0;
#pragma omp parallel num_threads(nthreads) reduction(| : bad)
    {
        float* xf = (float*)aligned_alloc(64, (size_t)((k * 4 + 63) / 64 * 64));
        if (!xf) bad |= 2;
#pragma omp for schedule(static)
        for (int64_t r = 0; r < m; ++r) {
            if (bad || !xf) continue;
            row_to_f32(x, dtype, r, k, xf);
            if (!quant_row(xf, k, k, qmax, u + r * k, s_tok + r)) bad |= 1;
        }
        free(xf);
    }
    return bad & 2 ? -1 : (bad ? 1 : 0);
}


// npu_quantize of x [M, K] with a per-tensor scale: q = sat(rint(f32(f32(x) * recip) + offset))
// (two float32 roundings, no FMA; NaN -> 0; +-inf saturate), written as u = q + 128 (uint8).
// nonfinite[r] = 1 where row r holds a NaN or an infinity (the linear's output row is NaN).
void aq_quant_static_u8(const void* x, int dtype, int64_t m, int64_t k, float recip, float offset,
                        uint8_t* u, uint8_t* nonfinite, int nthreads) {
#pragma omp parallel num_threads(nthreads)
    {
        float* xf = (float*)aligned_alloc(64, (size_t)((k * 4 + 63) / 64 * 64));
#pragma omp for schedule(static)
        for (int64_t r = 0; r < m; ++r) {
            row_to_f32(x, dtype, r, k, xf);
            const __m512 vr = _mm512_set1_ps(recip), vo = _mm512_set1_ps(offset);
            const __m512 lo = _mm512_set1_ps(-128.0f), hi = _mm512_set1_ps(127.0f);
            const __m512i off = _mm512_set1_epi32(128);
            const __m512 inf = _mm512_set1_ps(INFINITY);
            __mmask16 bad = 0;
            for (int64_t i = 0; i < k; i += 16) {
                const __mmask16 t = tail_mask(i, k);
                const __m512 xv = _mm512_maskz_loadu_ps(t, xf + i);
                // |x| == inf or x unordered: not finite
                bad |= _mm512_cmp_ps_mask(_mm512_abs_ps(xv), inf, _CMP_NLT_UQ);
                __m512 v = _mm512_add_ps(_mm512_mul_ps(xv, vr), vo);
                v = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                v = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(v, v, _CMP_ORD_Q), v);   // NaN -> 0
                v = _mm512_min_ps(_mm512_max_ps(v, lo), hi);
                _mm_mask_storeu_epi8(u + r * k + i, t,
                                     _mm512_cvtepi32_epi8(_mm512_add_epi32(_mm512_cvtps_epi32(v), off)));
            }
            nonfinite[r] = bad ? 1 : 0;
        }
        free(xf);
    }
}

// The float32 epilogue of both integer paths, one pass over t [M, N] (f32(acc), or f32(acc) *
// scale[n] from the GEMM), each step a separately rounded float32 operation (no FMA), optional
// steps skipped where their operand is NULL:
//     v = ((t [+ pre[n]]) [* col[n]]) [* row[m]] [+ post[n]],   out = dt(v)  (store_as)
// per-token: row = s_tok, post = bias; static: pre = quant_bias, col = deq_scale, with
// check_exact set: bit 1 of the result is set if some |t| >= 2^24 (t may then not be the
// exact accumulator). Bit 0: a NaN arose (torch's NaN encodings differ between its code
// paths, so the caller redoes the call in torch). out may be t itself (odtype 0).
int aq_epilogue(const float* t, const float* pre, const float* col, const float* row, const float* post,
                int check_exact, void* out, int odtype, int64_t m, int64_t n, int nthreads) {
    int flags = 0;
#pragma omp parallel for num_threads(nthreads) schedule(static) reduction(| : flags)
    for (int64_t r = 0; r < m; ++r) {
        const __m512 lim = _mm512_set1_ps(16777216.0f);
        for (int64_t i = 0; i < n; i += 16) {
            const __mmask16 mk = tail_mask(i, n);
            __m512 v = _mm512_maskz_loadu_ps(mk, t + r * n + i);
            if (check_exact && _mm512_mask_cmp_ps_mask(mk, _mm512_abs_ps(v), lim, _CMP_GE_OQ)) flags |= 2;
            if (pre) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mk, pre + i));
            if (col) v = _mm512_mul_ps(v, _mm512_maskz_loadu_ps(mk, col + i));
            if (row) v = _mm512_mul_ps(v, _mm512_set1_ps(row[r]));
            if (post) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mk, post + i));
            if (_mm512_mask_cmp_ps_mask(mk, v, v, _CMP_UNORD_Q)) flags |= 1;
            store_as(v, odtype, out, r * n + i, mk);
        }
    }
    return flags;
}

}  // extern "C"
