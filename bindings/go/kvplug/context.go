package kvplug

/*
#include "kvplug_go.h"
*/
import "C"

import (
	"fmt"
	"runtime"
	"sync/atomic"
)

// ContextOptions configures a CPU context.
type ContextOptions struct {
	// NumThreads is the number of CPU worker threads of CPU backends; 0 = all hardware threads.
	NumThreads int
}

// Context is a device and the stream work is launched on (kvp_context). This binding is CPU only.
// Every call only reads it.
type Context struct {
	h    handle[C.kvp_context]
	deps atomic.Int64 // open KvCache, Plan and Attention handles created from it
}

// NewContext creates a CPU context. opts may be nil (all hardware threads). It verifies the
// library's ABI version first.
func NewContext(opts *ContextOptions) (*Context, error) {
	const op = "NewContext"
	if err := checkABI(); err != nil {
		return nil, err
	}
	var o ContextOptions
	if opts != nil {
		o = *opts
	}
	if o.NumThreads < 0 || o.NumThreads > 1<<30 {
		return nil, invalid(op, "NumThreads=%d must be >= 0", o.NumThreads)
	}
	var ptr *C.kvp_context
	if err := call(op, func() C.kvp_status { return C.kvpg_context_create(C.int32_t(o.NumThreads), &ptr) }); err != nil {
		return nil, err
	}
	c := &Context{}
	c.h.ptr, c.h.kind = ptr, "Context"
	runtime.SetFinalizer(c, func(c *Context) { _ = c.Close() })
	return c, nil
}

// Close destroys the context. It fails with ErrFailedPrecondition while a KvCache, Plan or
// Attention created from it is open: the library keeps a pointer to the context in them.
// Closing a closed context does nothing.
func (c *Context) Close() error {
	c.h.mu.Lock()
	defer c.h.mu.Unlock()
	if c.h.ptr == nil {
		return nil
	}
	if n := c.deps.Load(); n > 0 {
		return &Error{Op: "Context.Close", Code: StatusFailedPrecondition, Message: fmt.Sprintf(
			"%d KvCache/Plan/Attention handle(s) created from this context are still open; close them first", n)}
	}
	C.kvp_context_destroy(c.h.ptr)
	c.h.ptr = nil
	runtime.SetFinalizer(c, nil)
	return nil
}

// newDependent runs create with the context pointer held shared (so Close waits) and, if it
// succeeds, counts one more dependent handle. The dependent's Close calls c.release.
func (c *Context) newDependent(op string, create func(ctx *C.kvp_context) error) error {
	ptr, err := c.h.shared(op)
	if err != nil {
		return err
	}
	defer c.h.mu.RUnlock()
	if err := create(ptr); err != nil {
		return err
	}
	c.deps.Add(1)
	return nil
}

func (c *Context) release() { c.deps.Add(-1) }
