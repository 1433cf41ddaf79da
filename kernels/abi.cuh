// Compile-time check that a kernel's C++ parameter list matches the ABI its Python launcher declares.
// Each parameter maps to one letter (see lowlat/jit/spec.py ArgKind; 'R' is the RankArgs struct); the JIT emits
//   static_assert(lowlat::abi::matches<decltype(&kernel<Cfg>)>("ppiL..."));
#pragma once

#include <cuda/std/type_traits>

namespace lowlat {
struct RankArgs;  // kernels/rank.cuh: the by-value struct every kernel ends with
}

namespace lowlat::abi {

template <class T>
__host__ __device__ constexpr char kind_of() {
    using U = cuda::std::remove_cv_t<T>;
    if constexpr (cuda::std::is_pointer_v<U>) return 'p';
    else if constexpr (cuda::std::is_same_v<U, RankArgs>) return 'R';
    else if constexpr (cuda::std::is_same_v<U, bool>) return 'b';
    else if constexpr (cuda::std::is_same_v<U, float>) return 'f';
    else if constexpr (cuda::std::is_integral_v<U> && sizeof(U) == 4) return cuda::std::is_signed_v<U> ? 'i' : 'I';
    else if constexpr (cuda::std::is_integral_v<U> && sizeof(U) == 8) return cuda::std::is_signed_v<U> ? 'l' : 'L';
    else return '?';
}

template <class F>
struct signature;

template <class... Args>
struct signature<void (*)(Args...)> {
    static constexpr char letters[] = {kind_of<Args>()..., '\0'};
};

template <class F>
__host__ __device__ constexpr bool matches(const char* declared) {
    const char* actual = signature<F>::letters;
    int i = 0;
    for (; actual[i] != '\0' && declared[i] != '\0'; ++i)
        if (actual[i] != declared[i]) return false;
    return actual[i] == declared[i];
}

}  // namespace lowlat::abi
