package kvplug

/*
#cgo pkg-config: kvplug
#include "kvplug_go.h"
*/
import "C"

import (
	"fmt"
	"runtime"
	"sync"
	"unsafe"
)

// DType names a KV-cache storage type (kvp_dtype). Float32, Float16 and BFloat16 also name the
// element types of tensors crossing the ABI.
type DType int32

const (
	Float32  DType = C.KVP_DTYPE_FLOAT32
	Float16  DType = C.KVP_DTYPE_FLOAT16
	BFloat16 DType = C.KVP_DTYPE_BFLOAT16
	FP8E4M3  DType = C.KVP_DTYPE_FP8_E4M3 // reserved for GPU caches with scales
)

func (d DType) String() string {
	switch d {
	case Float32:
		return "float32"
	case Float16:
		return "float16"
	case BFloat16:
		return "bfloat16"
	case FP8E4M3:
		return "fp8_e4m3"
	}
	return fmt.Sprintf("DType(%d)", int32(d))
}

// Size is the bytes of one element (0 for an unknown dtype).
func (d DType) Size() int {
	switch d {
	case Float32:
		return 4
	case Float16, BFloat16:
		return 2
	case FP8E4M3:
		return 1
	}
	return 0
}

// call runs f, one kvplug C call, with the goroutine locked to its OS thread: the library's error
// message is thread-local (kvp_last_error), and without the lock the goroutine could move to
// another thread between the call and reading the message, and read someone else's.
func call(op string, f func() C.kvp_status) error {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	if st := f(); st != C.KVP_OK {
		return &Error{Op: op, Code: Status(st), Message: C.GoString(C.kvp_last_error())}
	}
	return nil
}

// handle guards one library pointer. Calls hold the lock (shared or exclusive, per the header's
// thread-safety rules) for as long as C uses the pointer, so Close, which takes it exclusively,
// can never free it under a running call; and a deferred unlock references the owner, so the
// finalizer cannot run mid-call either.
type handle[T any] struct {
	mu   sync.RWMutex
	ptr  *T
	kind string
}

// shared returns the pointer with the lock held shared; release it with mu.RUnlock.
func (h *handle[T]) shared(op string) (*T, error) {
	h.mu.RLock()
	if h.ptr == nil {
		h.mu.RUnlock()
		return nil, closedError(op, h.kind)
	}
	return h.ptr, nil
}

// exclusive returns the pointer with the lock held exclusively; release it with mu.Unlock.
func (h *handle[T]) exclusive(op string) (*T, error) {
	h.mu.Lock()
	if h.ptr == nil {
		h.mu.Unlock()
		return nil, closedError(op, h.kind)
	}
	return h.ptr, nil
}

// close destroys the pointer once; it reports whether this call did.
func (h *handle[T]) close(destroy func(*T)) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.ptr == nil {
		return false
	}
	destroy(h.ptr)
	h.ptr = nil
	return true
}

// HeaderVersionMajor, HeaderVersionMinor and HeaderVersionPatch are the ABI version of the header
// this package was compiled against.
const (
	HeaderVersionMajor = C.KVP_ABI_VERSION_MAJOR
	HeaderVersionMinor = C.KVP_ABI_VERSION_MINOR
	HeaderVersionPatch = C.KVP_ABI_VERSION_PATCH
)

// ABIVersion returns the ABI version of the loaded library.
func ABIVersion() (major, minor, patch int) {
	v := int(C.kvp_abi_version())
	return v / 10000, v / 100 % 100, v % 100
}

// VersionString returns the library's version and build flavour, e.g. "0.1.0 (cpu)".
func VersionString() string { return C.GoString(C.kvp_version_string()) }

var (
	abiOnce sync.Once
	abiErr  error
)

// checkABI verifies once that the loaded library implements the header this package was compiled
// against: the same major version (the soname carries it, but LD_LIBRARY_PATH or a copied file can
// defeat that), and at least the header's minor version (every struct_size this package sends
// must be known to the library).
func checkABI() error {
	abiOnce.Do(func() {
		major, minor, patch := ABIVersion()
		if !abiCompatible(major, minor) {
			abiErr = &Error{Op: "kvplug", Code: StatusNotSupported, Message: fmt.Sprintf(
				"the loaded libkvplug has ABI %d.%d.%d but this binding needs %d.x with x >= %d (compiled against %d.%d.%d)",
				major, minor, patch, HeaderVersionMajor, HeaderVersionMinor, HeaderVersionMajor, HeaderVersionMinor,
				HeaderVersionPatch)}
		}
	})
	return abiErr
}

// abiCompatible: the header's major version, and a minor version at least the header's (a newer
// library accepts every struct_size this package sends; an older one rejects the newer structs).
func abiCompatible(major, minor int) bool {
	return major == HeaderVersionMajor && minor >= HeaderVersionMinor
}

// statusStringFromLibrary is kvp_status_string, for tests comparing Status.String with it.
func statusStringFromLibrary(s Status) string {
	return C.GoString(C.kvp_status_string(C.kvp_status(s)))
}

// Backends lists the registered attention backends, in registration order.
func Backends() ([]string, error) {
	if err := checkABI(); err != nil {
		return nil, err
	}
	var n C.int32_t
	if err := call("Backends", func() C.kvp_status { return C.kvp_backend_count(&n) }); err != nil {
		return nil, err
	}
	names := make([]string, 0, int(n))
	for i := C.int32_t(0); i < n; i++ {
		var name *C.char
		if err := call("Backends", func() C.kvp_status { return C.kvp_backend_name(i, &name) }); err != nil {
			return nil, err
		}
		names = append(names, C.GoString(name))
	}
	return names, nil
}

// BackendInfo describes an attention backend (kvp_backend_info).
type BackendInfo struct {
	Name            string
	DTypeMask       uint32 // bit (1 << DType) set for each supported cache dtype
	DeviceMask      uint32 // bit (1 << DLDeviceType) set for each supported device
	HeadSizes       []int
	SupportsLSE     bool // Attention.Run can write the log-sum-exp
	NeedsStateSlots bool // the backend keeps per-sequence state in the cache
}

// SupportsDType reports whether the backend reads caches of dtype d.
func (b BackendInfo) SupportsDType(d DType) bool { return maskHas(b.DTypeMask, d) }

// SupportsHeadSize reports whether head size n is listed.
func (b BackendInfo) SupportsHeadSize(n int) bool { return contains(b.HeadSizes, n) }

// GetBackendInfo describes backend name; ErrNotFound for an unknown name.
func GetBackendInfo(name string) (BackendInfo, error) {
	const op = "GetBackendInfo"
	if err := checkABI(); err != nil {
		return BackendInfo{}, err
	}
	cname := C.CString(name)
	defer C.free(unsafe.Pointer(cname))
	// In C memory: kvp_backend_info holds pointers the library fills in.
	info := (*C.kvp_backend_info)(C.calloc(1, C.sizeof_kvp_backend_info))
	defer C.free(unsafe.Pointer(info))
	info.struct_size = C.sizeof_kvp_backend_info
	if err := call(op, func() C.kvp_status { return C.kvp_backend_info_get(cname, info) }); err != nil {
		return BackendInfo{}, err
	}
	return BackendInfo{
		Name:            C.GoString(info.name),
		DTypeMask:       uint32(info.dtype_mask),
		DeviceMask:      uint32(info.device_mask),
		HeadSizes:       headSizes(info.head_sizes, info.num_head_sizes),
		SupportsLSE:     info.supports_lse != 0,
		NeedsStateSlots: info.needs_state_slots != 0,
	}, nil
}

// Device is a DLPack device type (DLDeviceType), as kvp_backend_device_info_get takes it.
type Device int32

const (
	DeviceCPU  Device = C.kDLCPU
	DeviceCUDA Device = C.kDLCUDA
)

func (d Device) String() string {
	switch d {
	case DeviceCPU:
		return "cpu"
	case DeviceCUDA:
		return "cuda"
	}
	return fmt.Sprintf("Device(%d)", int32(d))
}

// BackendDeviceInfo is what a backend offers on one device type (kvp_backend_device_info):
// capabilities differ per device (the CUDA kernels take fewer head sizes than the CPU engine).
type BackendDeviceInfo struct {
	Device          Device
	Available       bool   // the backend runs on this device in this build
	DTypeMask       uint32 // bit (1 << DType) per cache dtype on this device
	HeadSizes       []int
	SupportsLSE     bool // Outputs.LSE can be set
	SupportsEntropy bool // Outputs.Entropy can be set
	NeedsStateSlots bool // the cache needs state slots (Attention.StateBytes)
	Experimental    bool // its config table's fields may still change
}

// SupportsDType reports whether the backend reads caches of dtype d on this device.
func (b BackendDeviceInfo) SupportsDType(d DType) bool { return maskHas(b.DTypeMask, d) }

// SupportsHeadSize reports whether head size n is listed for this device.
func (b BackendDeviceInfo) SupportsHeadSize(n int) bool { return contains(b.HeadSizes, n) }

// GetBackendDeviceInfo describes backend name on device: ErrNotFound for an unknown name,
// ErrInvalidArgument for a device other than DeviceCPU or DeviceCUDA. A device this build lacks
// is reported with Available false, not as an error.
func GetBackendDeviceInfo(name string, device Device) (BackendDeviceInfo, error) {
	const op = "GetBackendDeviceInfo"
	if err := checkABI(); err != nil {
		return BackendDeviceInfo{}, err
	}
	cname := C.CString(name)
	defer C.free(unsafe.Pointer(cname))
	// In C memory, as in GetBackendInfo: the library writes a pointer into it.
	info := (*C.kvp_backend_device_info)(C.calloc(1, C.sizeof_kvp_backend_device_info))
	defer C.free(unsafe.Pointer(info))
	info.struct_size = C.sizeof_kvp_backend_device_info
	if err := call(op, func() C.kvp_status {
		return C.kvp_backend_device_info_get(cname, C.int32_t(device), info)
	}); err != nil {
		return BackendDeviceInfo{}, err
	}
	return BackendDeviceInfo{
		Device:          Device(info.device_type),
		Available:       info.available != 0,
		DTypeMask:       uint32(info.dtype_mask),
		HeadSizes:       headSizes(info.head_sizes, info.num_head_sizes),
		SupportsLSE:     info.supports_lse != 0,
		SupportsEntropy: info.supports_entropy != 0,
		NeedsStateSlots: info.needs_state_slots != 0,
		Experimental:    info.experimental != 0,
	}, nil
}

func maskHas(mask uint32, d DType) bool { return d >= 0 && d < 32 && mask&(1<<uint(d)) != 0 }

func contains(xs []int, n int) bool {
	for _, x := range xs {
		if x == n {
			return true
		}
	}
	return false
}

// headSizes copies a library-owned (static) array.
func headSizes(p *C.int32_t, n C.int32_t) []int {
	var out []int
	if n > 0 {
		for _, h := range unsafe.Slice((*int32)(unsafe.Pointer(p)), int(n)) {
			out = append(out, int(h))
		}
	}
	return out
}

// ConfigFormat is how a backend config is encoded (kvp_config_format).
type ConfigFormat int32

const (
	ConfigNone   ConfigFormat = C.KVP_CONFIG_NONE   // the backend's defaults
	ConfigBinary ConfigFormat = C.KVP_CONFIG_BINARY // FlatBuffers kvplug.AttentionConfig, verified
	ConfigJSON   ConfigFormat = C.KVP_CONFIG_JSON   // the same as JSON text
)

// CheckConfig checks a backend config without creating a backend: ErrNotFound for an unknown
// backend, ErrInvalidConfig for a config that fails parsing or verification.
func CheckConfig(backend string, format ConfigFormat, config []byte) error {
	const op = "CheckConfig"
	if err := checkABI(); err != nil {
		return err
	}
	cname := C.CString(backend)
	defer C.free(unsafe.Pointer(cname))
	var ptr unsafe.Pointer
	if len(config) > 0 {
		ptr = unsafe.Pointer(&config[0])
	}
	return call(op, func() C.kvp_status {
		return C.kvp_config_check(cname, C.int32_t(format), ptr, C.size_t(len(config)))
	})
}
