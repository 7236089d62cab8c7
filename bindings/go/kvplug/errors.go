package kvplug

import (
	"errors"
	"fmt"
)

// Status is a kvp_status code. Values are pinned by the ABI: they never change meaning.
type Status int32

// Every kvp_status code of kvplug.h.
const (
	StatusOK                 Status = 0
	StatusInvalidArgument    Status = 1  // a bad value, a tensor of the wrong shape/dtype/...
	StatusOutOfMemory        Status = 2  // a host or device allocation failed
	StatusNotSupported       Status = 3  // valid, but not implemented by this build/backend/device
	StatusOutOfRange         Status = 4  // an index (layer, block, slot, position) past its bound
	StatusInternal           Status = 5  // a bug in kvplug
	StatusInvalidConfig      Status = 6  // a backend config that fails verification or parsing
	StatusNotFound           Status = 7  // unknown backend name, unknown sequence id
	StatusAlreadyExists      Status = 8  // a sequence id that is already in use
	StatusNoFreeBlocks       Status = 9  // the block pool cannot satisfy the request now
	StatusFailedPrecondition Status = 10 // the object is not in a state that allows the call
	StatusDevice             Status = 11 // a CUDA/NCCL call failed
)

var statusNames = [...]string{
	"KVP_OK",
	"KVP_ERR_INVALID_ARGUMENT",
	"KVP_ERR_OUT_OF_MEMORY",
	"KVP_ERR_NOT_SUPPORTED",
	"KVP_ERR_OUT_OF_RANGE",
	"KVP_ERR_INTERNAL",
	"KVP_ERR_INVALID_CONFIG",
	"KVP_ERR_NOT_FOUND",
	"KVP_ERR_ALREADY_EXISTS",
	"KVP_ERR_NO_FREE_BLOCKS",
	"KVP_ERR_FAILED_PRECONDITION",
	"KVP_ERR_DEVICE",
}

// String returns the C name of the code ("KVP_ERR_NOT_FOUND"), as kvp_status_string does.
func (s Status) String() string {
	if s >= 0 && int(s) < len(statusNames) {
		return statusNames[s]
	}
	return "KVP_UNKNOWN_STATUS"
}

// Error is a failed call: the status code, the library's message (which names the offending
// argument and its value) and the Go method that failed.
type Error struct {
	Code    Status
	Message string
	Op      string // e.g. "BlockManager.Allocate"; empty in the sentinels
}

func (e *Error) Error() string {
	msg := "kvplug: "
	if e.Op != "" {
		msg += e.Op + ": "
	}
	msg += e.Code.String()
	if e.Message != "" {
		msg += ": " + e.Message
	}
	return msg
}

// Is makes errors.Is(err, ErrNotFound) true for every *Error with Code StatusNotFound: a target
// that is a sentinel (no Op, no Message) matches by code. A target with a message matches only
// the identical error.
func (e *Error) Is(target error) bool {
	t, ok := target.(*Error)
	if !ok {
		return false
	}
	if t.Op == "" && t.Message == "" {
		return t.Code == e.Code
	}
	return *t == *e
}

// Sentinels, one per failure code, for errors.Is.
var (
	ErrInvalidArgument    = &Error{Code: StatusInvalidArgument}
	ErrOutOfMemory        = &Error{Code: StatusOutOfMemory}
	ErrNotSupported       = &Error{Code: StatusNotSupported}
	ErrOutOfRange         = &Error{Code: StatusOutOfRange}
	ErrInternal           = &Error{Code: StatusInternal}
	ErrInvalidConfig      = &Error{Code: StatusInvalidConfig}
	ErrNotFound           = &Error{Code: StatusNotFound}
	ErrAlreadyExists      = &Error{Code: StatusAlreadyExists}
	ErrNoFreeBlocks       = &Error{Code: StatusNoFreeBlocks}
	ErrFailedPrecondition = &Error{Code: StatusFailedPrecondition}
	ErrDevice             = &Error{Code: StatusDevice}
)

// ErrClosed is wrapped by the error of any call on a closed handle. The library is not called.
var ErrClosed = errors.New("kvplug: use of a closed handle")

func closedError(op, kind string) error {
	return fmt.Errorf("kvplug: %s: the %s is closed: %w", op, kind, ErrClosed)
}

// invalid is an argument the binding rejects before calling C (typically a slice whose length
// disagrees with a shape, which C would otherwise read past).
func invalid(op, format string, args ...any) error {
	return &Error{Op: op, Code: StatusInvalidArgument, Message: fmt.Sprintf(format, args...)}
}
