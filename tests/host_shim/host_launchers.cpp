// The kernels of kernels/local_relation.cu behind a launch entry point shaped like
// cuLaunchKernel, for the CPU tests (tests/host_shim/host_launcher.py). Built by that module
// with g++ (plain, ASan + UBSan, or TSan); every launch runs in the CUDA execution emulator of
// cuda_emulator.h.
//
//   lr_host_signature(name)  the C parameter types of one instantiation, comma-separated, or
//                            NULL when it is not built, e.g. "const float*,...,long long,int"
//   lr_host_launch(name, grid[3], block[3], shared_bytes, args, nbytes, nargs)
//                            args[i] points at the value of parameter i (as for cuLaunchKernel);
//                            for a pointer parameter nbytes[i] is the size of the buffer behind
//                            it, which is copied into an exactly sized heap buffer for the
//                            launch (so that AddressSanitizer sees one element past it).
#include "cuda_emulator.h"

#include "local_relation.cu"

#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#ifdef LR_HOST_NEGATIVE_CONTROLS
#include "negative_controls.cuh"
#endif

namespace {

template <typename V>
struct TypeName;
template <>
struct TypeName<float> {
    static std::string get() { return "float"; }
};
template <>
struct TypeName<lr_half> {
    static std::string get() { return "lr_half"; }
};
template <>
struct TypeName<lr_bf16> {
    static std::string get() { return "lr_bf16"; }
};
template <>
struct TypeName<int> {
    static std::string get() { return "int"; }
};
template <>
struct TypeName<long long> {
    static std::string get() { return "long long"; }
};
template <typename V>
struct TypeName<V*> {
    static std::string get() {
        if constexpr (std::is_const<V>::value) {
            return "const " + TypeName<typename std::remove_const<V>::type>::get() + "*";
        } else {
            return TypeName<V>::get() + "*";
        }
    }
};

struct Entry {
    std::string name;
    std::string signature;
    int nargs;
    void (*invoke)(const void* fn, void** args);
    const void* fn;
};

template <typename... A, std::size_t... I>
void call(void (*k)(A...), void** args, std::index_sequence<I...>) {
    k(*static_cast<typename std::remove_cv<A>::type*>(args[I])...);
}

template <typename... A>
Entry make_entry(const std::string& name, void (*k)(A...)) {
    std::string sig;
    ((sig += (sig.empty() ? "" : ",") + TypeName<A>::get()), ...);
    return Entry{name, sig, static_cast<int>(sizeof...(A)),
                 [](const void* fn, void** args) {
                     call(reinterpret_cast<void (*)(A...)>(const_cast<void*>(fn)), args,
                          std::index_sequence_for<A...>{});
                 },
                 reinterpret_cast<const void*>(k)};
}

#define LR_ENTRY(KERNEL, T, K, S) \
    make_entry(#KERNEL "<" #T ", " #K ", " #S ">", &KERNEL<T, K, S>)
#define LR_ENTRIES(T, K, S) \
    LR_ENTRY(lr_forward, T, K, S), LR_ENTRY(lr_forward_pairs, T, K, S),   \
        LR_ENTRY(lr_forward_packed, T, K, S),                                            \
        LR_ENTRY(lr_backward_query, T, K, S), LR_ENTRY(lr_backward_query_pairs, T, K, S),   \
        LR_ENTRY(lr_backward_query_packed, T, K, S),                                       \
        LR_ENTRY(lr_backward_input, T, K, S), LR_ENTRY(lr_backward_input_pairs, T, K, S), \
        LR_ENTRY(lr_backward_input_packed, T, K, S)

const std::vector<Entry>& registry() {
    static const std::vector<Entry> entries = {
#ifdef LR_HOST_SMALL
        // sanitizer builds: a few instantiations keep the build short (K = 7 and bf16 included;
        // K = 3 at stride 4 keeps the backward query's key-gradient copies in global memory)
        LR_ENTRIES(float, 3, 1), LR_ENTRIES(float, 5, 2), LR_ENTRIES(lr_half, 3, 2),
        LR_ENTRIES(float, 7, 1), LR_ENTRIES(lr_bf16, 7, 2), LR_ENTRIES(float, 3, 4),
#else
        LR_ENTRIES(float, 3, 1), LR_ENTRIES(float, 3, 2), LR_ENTRIES(float, 3, 3),
        LR_ENTRIES(float, 5, 1), LR_ENTRIES(float, 5, 2), LR_ENTRIES(float, 5, 3),
        LR_ENTRIES(float, 7, 1), LR_ENTRIES(float, 7, 2), LR_ENTRIES(float, 7, 3),
        LR_ENTRIES(float, 9, 1), LR_ENTRIES(float, 9, 2), LR_ENTRIES(float, 9, 3),
        LR_ENTRIES(float, 11, 1), LR_ENTRIES(float, 11, 2), LR_ENTRIES(float, 11, 3),
        LR_ENTRIES(float, 13, 1), LR_ENTRIES(float, 13, 2), LR_ENTRIES(float, 13, 3),
        // the largest stride whose kernels fit 48 KB of static shared memory at K = 13 and 3
        // (cupy_backend.kernels_fit)
        LR_ENTRIES(float, 13, 4), LR_ENTRIES(float, 3, 7),
        LR_ENTRIES(float, 3, 4),  // the sanitizer builds' case of global key-gradient copies
        LR_ENTRIES(lr_half, 9, 2), LR_ENTRIES(lr_half, 11, 1), LR_ENTRIES(lr_half, 13, 3),
        LR_ENTRIES(lr_bf16, 9, 3), LR_ENTRIES(lr_bf16, 11, 2), LR_ENTRIES(lr_bf16, 13, 1),
        LR_ENTRIES(lr_half, 3, 1), LR_ENTRIES(lr_half, 3, 2), LR_ENTRIES(lr_half, 5, 2),
        LR_ENTRIES(lr_half, 7, 1),
        LR_ENTRIES(lr_half, 7, 2), LR_ENTRIES(lr_bf16, 3, 1), LR_ENTRIES(lr_bf16, 5, 2),
        LR_ENTRIES(lr_bf16, 7, 1), LR_ENTRIES(lr_bf16, 7, 2),
#endif
#ifdef LR_HOST_NEGATIVE_CONTROLS
        make_entry("lr_read_past_end", &lr_read_past_end),
        make_entry("lr_write_past_end", &lr_write_past_end),
        make_entry("lr_missing_sync", &lr_missing_sync),
        make_entry("lr_with_sync", &lr_with_sync),
        make_entry("lr_warp_ops", &lr_warp_ops),
        make_entry("lr_unloaded_slot", &lr_unloaded_slot),
        make_entry("lr_block_race", &lr_block_race),
        make_entry("lr_block_own", &lr_block_own),
        make_entry("lr_copy_unwaited", &lr_copy_unwaited),
        make_entry("lr_copy_waited", &lr_copy_waited),
        make_entry("lr_vector_read", &lr_vector_read),
#endif
    };
    return entries;
}

std::string without_spaces(std::string s) {
    std::string out;
    for (char c : s) {
        if (c != ' ') out += c;
    }
    return out;
}

// Instantiation names compare without spaces ("lr_forward<float, 3, 1>" == "lr_forward<float,3,1>").
const Entry* find(const char* name) {
    const std::string wanted = without_spaces(name);
    for (const Entry& e : registry()) {
        if (without_spaces(e.name) == wanted) return &e;
    }
    return nullptr;
}

}  // namespace

extern "C" const char* lr_host_signature(const char* name) {
    const Entry* e = find(name);
    return e ? e->signature.c_str() : nullptr;
}

extern "C" int lr_host_launch(const char* name, const unsigned* grid, const unsigned* block,
                              unsigned long long shared_bytes, void** args,
                              const unsigned long long* nbytes, int nargs) {
    const Entry* e = find(name);
    if (e == nullptr) return 1;
    if (nargs != e->nargs) return 2;
    // exactly sized copies of every buffer (AddressSanitizer sees accesses past their end); the
    // other builds follow each copy with a guard of its own size + 4 KB, filled with a pattern
    // that a write past the end changes (return 3)
#if defined(__SANITIZE_ADDRESS__)
    constexpr bool kGuarded = false;
#else
    constexpr bool kGuarded = true;
#endif
    std::vector<void*> originals(nargs, nullptr), copies(nargs, nullptr);
    std::vector<void*> values(args, args + nargs);
    std::vector<std::size_t> guards(nargs, 0);
    for (int i = 0; i < nargs; ++i) {
        if (nbytes[i] == 0) continue;
        guards[i] = kGuarded ? nbytes[i] + 4096 : 0;
        originals[i] = *static_cast<void**>(args[i]);
        copies[i] = std::malloc(nbytes[i] + guards[i]);
        std::memcpy(copies[i], originals[i], nbytes[i]);
        std::memset(static_cast<unsigned char*>(copies[i]) + nbytes[i], 0xa5, guards[i]);
        values[i] = &copies[i];
    }
    lr_emu::launch(dim3{grid[0], grid[1], grid[2]}, dim3{block[0], block[1], block[2]},
                   shared_bytes, [&] { e->invoke(e->fn, values.data()); });
    int rc = 0;
    for (int i = 0; i < nargs; ++i) {
        if (nbytes[i] == 0) continue;
        const unsigned char* guard = static_cast<unsigned char*>(copies[i]) + nbytes[i];
        for (std::size_t b = 0; b < guards[i]; ++b) rc = guard[b] != 0xa5 ? 3 : rc;
        std::memcpy(originals[i], copies[i], nbytes[i]);
        std::free(copies[i]);
    }
    return rc;
}

// lr_forward_packed's geometry (lr_forward_shape<K, S, LR_SLOTS>) and lr_forward_pairs' (SLOTS =
// LR_PAIR_SLOTS) for K = 3..13 odd, strides 1-3: strip, output rows, staged rows and columns,
// pitch, slot, dynamic shared floats and the loader's image box into out[9]; 1 for a (K, S)
// not in the table. cupy_backend.packed_shape and pairs_shape mirror them.
namespace {
template <int K, int S, int SLOTS>
void packed_shape(int* out) {
    using P = lr_forward_shape<K, S, SLOTS>;
    const int v[9] = {P::R, P::OH, P::IH, P::IW, P::PW, P::SLOT, P::FLOATS, P::BOX_H, P::BOX_W};
    std::memcpy(out, v, sizeof v);
}
struct PackedRow {
    int K, S;
    void (*fn)(int*);
    void (*pairs)(int*);
};
#define LR_PACKED_ROW(K, S) \
    {K, S, &packed_shape<K, S, LR_SLOTS>, &packed_shape<K, S, LR_PAIR_SLOTS>}
#define LR_PACKED_ROWS(K) LR_PACKED_ROW(K, 1), LR_PACKED_ROW(K, 2), LR_PACKED_ROW(K, 3)
const PackedRow kPackedRows[] = {LR_PACKED_ROWS(3), LR_PACKED_ROWS(5), LR_PACKED_ROWS(7),
                                 LR_PACKED_ROWS(9), LR_PACKED_ROWS(11), LR_PACKED_ROWS(13)};
}  // namespace

// lr_backward_input_packed's geometry (lr_input_shape<K, 1, LR_SLOTS>) and
// lr_backward_input_pairs' (SLOTS = LR_PAIR_SLOTS) for K = 3..13 odd: strip, input rows, staged
// output rows and columns, pitch, slot, dynamic shared floats and the loader's output box into
// out[9]; 1 for a K not in the table. cupy_backend.packed_input_shape and pairs_input_shape
// mirror them.
namespace {
template <int K, int SLOTS>
void packed_input_shape(int* out) {
    using P = lr_input_shape<K, 1, SLOTS>;
    const int v[9] = {P::RI, P::ITH, P::OH, P::OW, P::PO, P::SLOT, P::FLOATS, P::BOX_H, P::BOX_W};
    std::memcpy(out, v, sizeof v);
}
#define LR_INPUT_ROW(K) \
    {K, 1, &packed_input_shape<K, LR_SLOTS>, &packed_input_shape<K, LR_PAIR_SLOTS>}
const PackedRow kPackedInputRows[] = {LR_INPUT_ROW(3), LR_INPUT_ROW(5),  LR_INPUT_ROW(7),
                                      LR_INPUT_ROW(9), LR_INPUT_ROW(11), LR_INPUT_ROW(13)};

// The geometry of (K, S) in `rows` (the packed layout's, or the pairs' with `pairs`) into out;
// 1 for a (K, S) not in the table.
template <std::size_t N>
int lookup_shape(const PackedRow (&rows)[N], int K, int S, bool pairs, int* out) {
    for (const PackedRow& row : rows) {
        if (row.K == K && row.S == S) {
            (pairs ? row.pairs : row.fn)(out);
            return 0;
        }
    }
    return 1;
}
}  // namespace

extern "C" int lr_host_packed_input_shape(int K, int* out) {
    return lookup_shape(kPackedInputRows, K, 1, false, out);
}

extern "C" int lr_host_pairs_input_shape(int K, int* out) {
    return lookup_shape(kPackedInputRows, K, 1, true, out);
}

extern "C" int lr_host_packed_shape(int K, int S, int* out) {
    return lookup_shape(kPackedRows, K, S, false, out);
}

extern "C" int lr_host_pairs_shape(int K, int S, int* out) {
    return lookup_shape(kPackedRows, K, S, true, out);
}

// lr_backward_query_packed's geometry (lr_query_packed_shape<K, S>) and lr_backward_query_pairs'
// (lr_query_pairs_shape<K, S>) for the same (K, S): strip, output rows, staged rows and columns,
// pitch, slot, copy, dynamic shared floats and the loader's image box into out[10].
// cupy_backend.packed_query_shape and pairs_query_shape mirror them.
namespace {
template <typename P>
void query_shape(int* out) {
    const int v[10] = {P::R,  P::OTH, P::IH,     P::IW,    P::PW,
                       P::SLOT, P::GS, P::FLOATS, P::BOX_H, P::BOX_W};
    std::memcpy(out, v, sizeof v);
}
#define LR_QUERY_ROW(K, S) \
    {K, S, &query_shape<lr_query_packed_shape<K, S>>, &query_shape<lr_query_pairs_shape<K, S>>}
#define LR_PACKED_QUERY_ROWS(K) LR_QUERY_ROW(K, 1), LR_QUERY_ROW(K, 2), LR_QUERY_ROW(K, 3)
const PackedRow kPackedQueryRows[] = {LR_PACKED_QUERY_ROWS(3),  LR_PACKED_QUERY_ROWS(5),
                                      LR_PACKED_QUERY_ROWS(7),  LR_PACKED_QUERY_ROWS(9),
                                      LR_PACKED_QUERY_ROWS(11), LR_PACKED_QUERY_ROWS(13)};
}  // namespace

extern "C" int lr_host_packed_query_shape(int K, int S, int* out) {
    return lookup_shape(kPackedQueryRows, K, S, false, out);
}

extern "C" int lr_host_pairs_query_shape(int K, int S, int* out) {
    return lookup_shape(kPackedQueryRows, K, S, true, out);
}

// The 16-bit conversion helpers of lr_common.cuh, elementwise.
extern "C" void lr_host_float_to_half(const float* in, unsigned short* out, long long n) {
    for (long long i = 0; i < n; ++i) out[i] = lr_float_to_half_bits(in[i]);
}
extern "C" void lr_host_half_to_float(const unsigned short* in, float* out, long long n) {
    for (long long i = 0; i < n; ++i) out[i] = lr_half_bits_to_float(in[i]);
}
extern "C" void lr_host_float_to_bf16(const float* in, unsigned short* out, long long n) {
    for (long long i = 0; i < n; ++i) out[i] = lr_float_to_bf16_bits(in[i]);
}
extern "C" void lr_host_bf16_to_float(const unsigned short* in, float* out, long long n) {
    for (long long i = 0; i < n; ++i) out[i] = lr_bf16_bits_to_float(in[i]);
}
