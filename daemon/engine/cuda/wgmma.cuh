/* Hopper warpgroup MMA (wgmma) for the cuda backend's kernels: shared-memory matrix descriptors
 * and the few shapes they use, as inline PTX. A warpgroup (4 warps, 128 threads) issues them
 * together; accumulators of m64nN f32 have, per warp (16 rows of the 64) and per 8 columns, the
 * m16n8 layout of mma.sync: element 4j + {0, 1, 2, 3} of a thread is (row g, column 8j + 2t),
 * (g, 8j + 2t + 1), (g + 8, 8j + 2t), (g + 8, 8j + 2t + 1) with g = lane / 4, t = lane % 4.
 * Descriptors: K-major operands, either without swizzle (core matrices of 8 rows x 16 bytes;
 * lbo = the byte distance of core matrices adjacent along K, sbo = along M or N) or with the
 * 128-byte swizzle (rows of 128 bytes, 16-byte chunk c of row r at c ^ (r % 8), 8-row groups
 * 1024 bytes apart, tiles 1024-byte aligned; a k-step starts its bytes further in the row).
 * A transposed (MN-major) A operand, 16-bit types only: 128-byte rows of 64 M elements, one row per
 * K index, the same swizzle, 8-row atoms of 1 KB; with M = 64 one atom covers M, and both byte
 * offsets set to the atom size cover whichever of them the hardware takes as the K stride.
 * Usage: wg_fence on the accumulators (and the register A operands) around the asynchronous
 * MMAs so the compiler neither reads them early nor reuses their registers; wg_begin before the
 * first MMA of a batch; wg_commit_wait after it; fence.proxy.async between generic writes of a
 * shared-memory operand and the MMAs that read it. The library is built for sm_90a only
 * (cmake/Cuda.cmake); elsewhere these trap. */
#ifndef DSV32_CUDA_WGMMA_CUH
#define DSV32_CUDA_WGMMA_CUH

#include <stdint.h>

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define WG_OK 1
#else
#define WG_OK 0
#endif

static __device__ __forceinline__ uint64_t wg_desc(uint32_t saddr, uint32_t lbo, uint32_t sbo)
{
    return (uint64_t)((saddr & 0x3ffffu) >> 4) | ((uint64_t)(lbo >> 4) << 16) | ((uint64_t)(sbo >> 4) << 32);
}

static __device__ __forceinline__ uint64_t wg_desc_sw128(uint32_t saddr)
{
    return wg_desc(saddr, 16, 1024) | ((uint64_t)1 << 62);
}

/* the descriptor d of an address `bytes` further on (the start address field, bits 0-13, does
 * not carry over: shared memory ends below 256 KB): one 32-bit add instead of the descriptor
 * built again (~11 uniform instructions a wgmma in the MLA's QK^T) */
static __device__ __forceinline__ uint64_t wg_desc_add(uint64_t d, uint32_t bytes)
{
    uint32_t lo, hi;
    asm("mov.b64 {%0, %1}, %2;" : "=r"(lo), "=r"(hi) : "l"(d));
    uint64_t r;
    asm("mov.b64 %0, {%1, %2};" : "=l"(r) : "r"(lo + (bytes >> 4)), "r"(hi));
    return r;
}

template <int N>
static __device__ __forceinline__ void wg_fence(float (&d)[N])
{
#pragma unroll
    for (int i = 0; i < N; i++)
        asm volatile("" : "+f"(d[i])::"memory");
}

static __device__ __forceinline__ void wg_fence_a(uint32_t (&a)[4])
{
    asm volatile("" : "+r"(a[0]), "+r"(a[1]), "+r"(a[2]), "+r"(a[3])::"memory");
}

static __device__ __forceinline__ void wg_begin() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }

static __device__ __forceinline__ void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }

static __device__ __forceinline__ void wg_wait0() { asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory"); }

static __device__ __forceinline__ void wg_commit_wait()
{
    wg_commit();
    wg_wait0();
}

#define WG_D32                                                                                     \
    "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),  \
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]),       \
        "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]),     \
        "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]),     \
        "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
#define WG_R32                                                                                     \
    "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25," \
    "%26,%27,%28,%29,%30,%31}"

/* d (+)= A B, m64n64k32, e4m3 x e4m3 -> f32, both from shared memory (acc = 0: d = A B) */
static __device__ __forceinline__ void wgmma_e4m3_ss_n64(float (&d)[32], uint64_t da, uint64_t db, int acc)
{
#if WG_OK
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n64k32.f32.e4m3.e4m3 " WG_R32 ", %32, %33, p, 1, 1;\n}\n"
                 : WG_D32
                 : "l"(da), "l"(db), "r"(acc)
                 : "memory");
#else
    __trap();
#endif
}

/* d (+)= A B, m64n64k16, f16: A from registers (the m16n8k16 A fragment per warp), B from shared memory */
static __device__ __forceinline__ void wgmma_f16_rs_n64(float (&d)[32], const uint32_t (&a)[4], uint64_t db, int acc)
{
#if WG_OK
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 " WG_R32 ", {%32,%33,%34,%35}, %36, p, 1, 1, 0;\n}\n"
                 : WG_D32
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(acc)
                 : "memory");
#else
    __trap();
#endif
}

/* d (+)= A B, m64n64k16, bf16, both from shared memory, A transposed (MN-major: rows of 64 M
 * elements per K index, 128-byte swizzle, 8-row atoms of 1 KB) */
static __device__ __forceinline__ void wgmma_bf16_ss_n64_ta(float (&d)[32], uint64_t da, uint64_t db, int acc)
{
#if WG_OK
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " WG_R32 ", %32, %33, p, 1, 1, 1, 0;\n}\n"
                 : WG_D32
                 : "l"(da), "l"(db), "r"(acc)
                 : "memory");
#else
    __trap();
#endif
}

/* d (+)= A B, m64n32k16, bf16, both from shared memory */
static __device__ __forceinline__ void wgmma_bf16_ss_n32(float (&d)[16], uint64_t da, uint64_t db, int acc)
{
#if WG_OK
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 "
                 "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15}, %16, %17, p, 1, 1, 0, 0;\n}\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
                   "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]),
                   "+f"(d[15])
                 : "l"(da), "l"(db), "r"(acc)
                 : "memory");
#else
    __trap();
#endif
}

#define WG_D128 \
        "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), \
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), \
        "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), \
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), \
        "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), \
        "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), \
        "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), \
        "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), \
        "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), \
        "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), \
        "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), \
        "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
#define WG_R128 "{" \
    "%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15," \
    "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31," \
    "%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47," \
    "%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63," \
    "%64,%65,%66,%67,%68,%69,%70,%71,%72,%73,%74,%75,%76,%77,%78,%79," \
    "%80,%81,%82,%83,%84,%85,%86,%87,%88,%89,%90,%91,%92,%93,%94,%95," \
    "%96,%97,%98,%99,%100,%101,%102,%103,%104,%105,%106,%107,%108,%109,%110,%111," \
    "%112,%113,%114,%115,%116,%117,%118,%119,%120,%121,%122,%123,%124,%125,%126,%127" "}"

/* d (+)= A B, m64n256k16, bf16, both from shared memory, B transposed (MN-major: rows of 64 N
 * elements per K index in 128-byte-swizzled atoms; the descriptor's leading offset steps to the
 * next 64 N elements, its stride offset to the next 8 K rows) */
static __device__ __forceinline__ void wgmma_bf16_ss_n256_tb(float (&d)[128], uint64_t da, uint64_t db, int acc)
{
#if WG_OK
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 " WG_R128 ", %128, %129, p, 1, 1, 0, 1;\n}\n"
                 : WG_D128
                 : "l"(da), "l"(db), "r"(acc)
                 : "memory");
#else
    __trap();
#endif
}

/* d (+)= A B, m64n256k16, bf16, A from registers (the m16n8k16 A fragment per warp: rows 16w + g
 * and + 8, K columns 2t, + 1, + 8, + 9), B as wgmma_bf16_ss_n256_tb's */
static __device__ __forceinline__ void wgmma_bf16_rs_n256_tb(float (&d)[128], const uint32_t (&a)[4], uint64_t db,
                                                             int acc)
{
#if WG_OK
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %133, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 " WG_R128
                 ", {%128,%129,%130,%131}, %132, p, 1, 1, 1;\n}\n"
                 : WG_D128
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(acc)
                 : "memory");
#else
    __trap();
#endif
}

/* d (+)= A B, m64n64k16, bf16, both from shared memory, both K-major */
static __device__ __forceinline__ void wgmma_bf16_ss_n64(float (&d)[32], uint64_t da, uint64_t db, int acc)
{
#if WG_OK
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " WG_R32 ", %32, %33, p, 1, 1, 0, 0;\n}\n"
                 : WG_D32
                 : "l"(da), "l"(db), "r"(acc)
                 : "memory");
#else
    __trap();
#endif
}

/* d (+)= A B, m64n8k16, bf16, A from registers (the m16n8k16 A fragment per warp), B from shared
 * memory K-major (core matrices of 8 columns x 16 bytes, lbo apart along K) */
static __device__ __forceinline__ void wgmma_bf16_rs_n8(float (&d)[4], const uint32_t (&a)[4],
                                                        uint64_t db, int acc)
{
#if WG_OK
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %9, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n8k16.f32.bf16.bf16 {%0,%1,%2,%3}, "
                 "{%4,%5,%6,%7}, %8, p, 1, 1, 0;\n}\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(acc)
                 : "memory");
#else
    __trap();
#endif
}

/* relu(lo), relu(hi) rounded to bf16 and packed (lo in the low half) */
static __device__ __forceinline__ uint32_t bf16x2_relu(float lo, float hi)
{
    uint32_t r;
    asm("cvt.rn.relu.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

/* lo, hi rounded to bf16 and packed (lo in the low half; __floats2bfloat162_rn's instruction) */
static __device__ __forceinline__ uint32_t pack_bf16(float lo, float hi)
{
    uint32_t r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

#undef WG_D32
#undef WG_D128
#undef WG_R128
#undef WG_R32

/* ---- the bulk copy engine (TMA without a tensor map) and its shared-memory barrier ----
 * A thread arms the barrier with the bytes its copy will bring (mbar_arrive_tx, an arrival
 * too) and issues the copy (bulk_g2s: global -> shared, 16-byte aligned, a multiple of 16
 * bytes); the barrier's phase completes when all its expected arrivals have come and every byte
 * has landed; waiters spin on the phase's parity. Generic-proxy reads of the destination must be
 * ordered before a new copy into it by fence.proxy.async. */
static __device__ __forceinline__ void mbar_init(uint64_t *bar, int count)
{
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"((uint32_t)__cvta_generic_to_shared(bar)), "r"(count)
                 : "memory");
}

static __device__ __forceinline__ void mbar_arrive_tx(uint64_t *bar, uint32_t bytes)
{
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"((uint32_t)__cvta_generic_to_shared(bar)),
                 "r"(bytes)
                 : "memory");
}

static __device__ __forceinline__ void mbar_wait(uint64_t *bar, uint32_t parity)
{
    asm volatile("{\n.reg .pred done;\nwait_%=:\n"
                 "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
                 "@!done bra wait_%=;\n}\n" ::"r"((uint32_t)__cvta_generic_to_shared(bar)),
                 "r"(parity)
                 : "memory");
}

static __device__ __forceinline__ void mbar_arrive(uint64_t *bar)
{
    asm volatile(
        "mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"((uint32_t)__cvta_generic_to_shared(bar))
        : "memory");
}

/* ---- thread-block clusters: a peer CTA's shared memory and barriers (the cluster's rank and
 * barrier: cooperative_groups) ----
 * cl_map gives the cluster-window address of a local shared address in CTA rank (the window of
 * a CTA is contiguous: offsets add); bulk_s2cl copies there and counts the bytes on that CTA's
 * barrier (complete_tx); mbar_arrive_cl arrives on a barrier of any CTA of the cluster, with
 * the default semantics as CUTLASS's cluster barrier (release and acquire at cluster scope cost a
 * fence and an L1 invalidation per use). */
static __device__ __forceinline__ uint32_t cl_map(uint32_t saddr, uint32_t rank)
{
    uint32_t d;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(d) : "r"(saddr), "r"(rank));
    return d;
}

/* bytes (a multiple of 16) from local shared memory src to a CTA's shared memory at cluster
 * address dst, counted on its barrier at cluster address cbar */
static __device__ __forceinline__ void bulk_s2cl(uint32_t dst, const void *src, uint32_t bytes,
                                                 uint32_t cbar)
{
#if WG_OK
    asm volatile("cp.async.bulk.shared::cluster.shared::cta.mbarrier::complete_tx::bytes [%0], "
                 "[%1], %2, [%3];" ::"r"(dst),
                 "r"((uint32_t)__cvta_generic_to_shared(src)), "r"(bytes), "r"(cbar)
                 : "memory");
#else
    __trap();
#endif
}

static __device__ __forceinline__ void mbar_arrive_cl(uint32_t cbar)
{
    asm volatile("mbarrier.arrive.shared::cluster.b64 _, [%0];" ::"r"(cbar) : "memory");
}

static __device__ __forceinline__ void bulk_g2s(void *dst, const void *src, uint32_t bytes,
                                                uint64_t *bar)
{
#if WG_OK
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                     (uint32_t)__cvta_generic_to_shared(dst)),
                 "l"(src), "r"(bytes), "r"((uint32_t)__cvta_generic_to_shared(bar))
                 : "memory");
#else
    __trap();
#endif
}

/* The same with an L2 cache policy (l2_policy(true): evict first, for data read once) */
static __device__ __forceinline__ void bulk_g2s_hint(void *dst, const void *src, uint32_t bytes, uint64_t *bar,
                                                     uint64_t policy)
{
#if WG_OK
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1], %2, [%3], %4;" ::"r"(
                     (uint32_t)__cvta_generic_to_shared(dst)),
                 "l"(src), "r"(bytes), "r"((uint32_t)__cvta_generic_to_shared(bar)), "l"(policy)
                 : "memory");
#else
    __trap();
#endif
}

static __device__ __forceinline__ uint64_t l2_policy(bool evict_first)
{
    uint64_t p = 0;
#if WG_OK
    if (evict_first)
        asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(p));
    else
        asm volatile("createpolicy.fractional.L2::evict_normal.b64 %0, 1.0;" : "=l"(p));
#endif
    return p;
}

/* A box of a 2-d tensor map (tmap: the generic address of a __grid_constant__ CUtensorMap
 * parameter) at element coordinates (x, y) -> shared memory, completing on bar like bulk_g2s;
 * the map's swizzle is applied by the copy engine (128-byte swizzle: dst 1024-byte aligned) */
static __device__ __forceinline__ void tma_2d_g2s(void *dst, const void *tmap, int x, int y, uint64_t *bar,
                                                  uint64_t policy)
{
#if WG_OK
    asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes.L2::cache_hint"
                 " [%0], [%1, {%2, %3}], [%4], %5;" ::"r"((uint32_t)__cvta_generic_to_shared(dst)),
                 "l"(tmap), "r"(x), "r"(y), "r"((uint32_t)__cvta_generic_to_shared(bar)), "l"(policy)
                 : "memory");
#else
    __trap();
#endif
}

#endif
