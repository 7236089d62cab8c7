// Package kvplug is the Go binding of libkvplug: paged-KV attention backends and a KV block manager
// behind a stable C ABI (abi/include/kvplug/kvplug.h, the contract this package follows).
//
// # Building
//
// The package links against libkvplug.so with cgo, through pkg-config (#cgo pkg-config: kvplug):
// install kvplug (cmake --install BUILD --prefix PREFIX writes PREFIX/lib/pkgconfig/kvplug.pc) and,
// for a prefix pkg-config does not search, point PKG_CONFIG_PATH at it; the rpath is the caller's:
//
//	export PKG_CONFIG_PATH=$PREFIX/lib/pkgconfig
//	export CGO_LDFLAGS="-Wl,-rpath,$PREFIX/lib"
//	go test ./...
//
// (bindings/go/run_tests.sh BUILD_DIR does this, installing the build into a prefix.)
// dlpack/dlpack.h must be on the C include path; add CGO_CFLAGS=-I<dir> if it is not in a default
// location.
//
// # Handles and lifetimes
//
// Context, BlockManager, KvCache, Plan and Attention wrap library handles. Close releases one; it is
// idempotent, and any later method call returns an error wrapping ErrClosed instead of passing a
// dangling pointer to C. A finalizer closes a handle that was dropped without Close, but only as a
// safety net: close handles explicitly. A Context cannot be closed while a KvCache, Plan or
// Attention created from it is still open (the library keeps a pointer to it in those).
//
// No Go memory is kept by the library: slices are passed to C only for the duration of a call.
// Caches whose pages are Go memory (kvp_kv_cache_create_from_tensors) are therefore not offered.
//
// # Concurrency
//
// The library's rules (kvplug.h): calls on one handle that mutate it must be serialized; different
// handles may be used from different goroutines at once; runs reading one Attention, Plan and
// KvCache may run concurrently when they write different outputs. This binding guards every handle
// with a read-write lock that follows those rules: calls the header documents as read-only take it
// shared, mutating calls (BlockManager.Allocate, KvCache.Write, Plan.Update, ...) take it
// exclusively, and Close waits for calls in flight. Every handle is therefore safe to share between
// goroutines; unrelated handles never contend.
//
// # Errors
//
// A failed library call returns *Error carrying the status code and the library's message (the
// thread-local kvp_last_error, read on the OS thread that made the call). Compare with errors.Is
// against the sentinels (ErrNotFound, ErrNoFreeBlocks, ...) or read Code through errors.As.
// Arguments the binding can reject before calling C (a slice shorter than its shape) return an
// *Error with StatusInvalidArgument.
//
// CPU only: tensors are Go slices ([]float32, or []uint16 holding float16/bfloat16 bits).
package kvplug
