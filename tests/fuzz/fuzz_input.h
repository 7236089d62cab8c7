// Reads a libFuzzer input as a stream of small integers; past its end every read returns 0, so any
// input decodes to a valid (possibly empty) program.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

namespace kvplug::fuzz {

class Input {
 public:
  Input(const uint8_t* data, size_t size) : data_(data), size_(size) {}
  bool empty() const { return pos_ >= size_; }
  size_t remaining() const { return pos_ < size_ ? size_ - pos_ : 0; }
  uint8_t Byte() { return pos_ < size_ ? data_[pos_++] : 0; }
  // In [0, n) (n > 0).
  uint32_t Below(uint32_t n) { return Byte() % n; }
  bool Bit() { return Byte() & 1; }
  template <class T>
  T Raw() {
    T v{};
    uint8_t b[sizeof(T)] = {};
    for (size_t i = 0; i < sizeof(T); ++i) b[i] = Byte();
    std::memcpy(&v, b, sizeof(T));
    return v;
  }

 private:
  const uint8_t* data_;
  size_t size_;
  size_t pos_ = 0;
};

// Fails the run (libFuzzer reports it as a crash, with the input) when `cond` is false.
#define FUZZ_CHECK(cond)                                                                            \
  do {                                                                                              \
    if (!(cond)) {                                                                                  \
      std::fprintf(stderr, "%s:%d: FUZZ_CHECK failed: %s\n", __FILE__, __LINE__, #cond);           \
      __builtin_trap();                                                                             \
    }                                                                                               \
  } while (0)

}  // namespace kvplug::fuzz
