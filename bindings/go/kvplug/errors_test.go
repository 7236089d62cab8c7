package kvplug_test

import (
	"errors"
	"fmt"
	"strings"
	"testing"

	"kvplug.dev/kvplug/kvplug"
)

// wantErr fails unless err matches target through errors.Is and, when substr is set, its message
// contains substr (the library names the offending argument: check that it reaches Go intact).
func wantErr(t *testing.T, err error, target error, substr string) {
	t.Helper()
	if err == nil {
		t.Fatalf("got nil error, want %v", target)
	}
	if !errors.Is(err, target) {
		t.Fatalf("got %v, want errors.Is(_, %v)", err, target)
	}
	if substr != "" && !strings.Contains(err.Error(), substr) {
		t.Fatalf("error %q does not mention %q", err, substr)
	}
}

// errors.Is matches sentinels by code only, errors.As exposes the code and message, and the
// string names the Go method, the status and the library's message.
func TestErrorMatching(t *testing.T) {
	bm, err := kvplug.NewBlockManager(kvplug.BlockManagerOptions{BlockSize: 4, NumDeviceBlocks: 4})
	if err != nil {
		t.Fatal(err)
	}
	defer bm.Close()
	err = bm.Free(42)
	wantErr(t, err, kvplug.ErrNotFound, "42")
	if errors.Is(err, kvplug.ErrNoFreeBlocks) || errors.Is(err, kvplug.ErrClosed) {
		t.Fatalf("%v matches a sentinel of another code", err)
	}
	var ke *kvplug.Error
	if !errors.As(err, &ke) || ke.Code != kvplug.StatusNotFound || ke.Op != "BlockManager.Free" || ke.Message == "" {
		t.Fatalf("errors.As: %#v", ke)
	}
	if s := err.Error(); !strings.HasPrefix(s, "kvplug: BlockManager.Free: KVP_ERR_NOT_FOUND: ") {
		t.Fatalf("Error() = %q", s)
	}
	// A non-sentinel target matches only the identical error.
	other := &kvplug.Error{Code: kvplug.StatusNotFound, Message: "something else"}
	if errors.Is(err, other) {
		t.Fatal("matched an *Error with a different message")
	}
	if copy := *ke; !errors.Is(err, &copy) {
		t.Fatal("did not match an identical *Error")
	}
	if kvplug.Status(99).String() != "KVP_UNKNOWN_STATUS" {
		t.Fatal("unknown status name")
	}
}

func TestBackendDiscovery(t *testing.T) {
	names, err := kvplug.Backends()
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, n := range names {
		found = found || n == "dense"
	}
	if !found {
		t.Fatalf("Backends() = %v lacks dense", names)
	}
	info, err := kvplug.GetBackendInfo("dense")
	if err != nil {
		t.Fatal(err)
	}
	if info.Name != "dense" || !info.SupportsDType(kvplug.Float32) || !info.SupportsHeadSize(128) || info.SupportsHeadSize(100) ||
		!info.SupportsLSE || info.DeviceMask&(1<<1) == 0 /* kDLCPU */ {
		t.Fatalf("dense info: %+v", info)
	}
	_, err = kvplug.GetBackendInfo("no-such-backend")
	wantErr(t, err, kvplug.ErrNotFound, "no-such-backend")
	if major, _, _ := kvplug.ABIVersion(); major != kvplug.HeaderVersionMajor {
		t.Fatalf("library ABI major %d, header %d", major, kvplug.HeaderVersionMajor)
	}
	if !strings.Contains(kvplug.VersionString(), "cpu") && !strings.Contains(kvplug.VersionString(), "cuda") {
		t.Fatalf("VersionString() = %q", kvplug.VersionString())
	}
}

func TestConfigErrors(t *testing.T) {
	good := `{"backend_config_type": "DenseConfig", "backend_config": {"window_left": 16}}`
	if err := kvplug.CheckConfig("dense", kvplug.ConfigJSON, []byte(good)); err != nil {
		t.Fatalf("valid config rejected: %v", err)
	}
	if err := kvplug.CheckConfig("dense", kvplug.ConfigNone, nil); err != nil {
		t.Fatalf("no config rejected: %v", err)
	}
	for name, cfg := range map[string]string{
		"malformed":      `{not json`,
		"wrong-type":     `{"backend_config_type": "StarConfig", "backend_config": {}}`,
		"bad-field-type": `{"backend_config_type": "DenseConfig", "backend_config": {"window_left": "x"}}`,
		"bad-value":      `{"backend_config_type": "DenseConfig", "backend_config": {"logits_soft_cap": -1}}`,
	} {
		t.Run(name, func(t *testing.T) {
			wantErr(t, kvplug.CheckConfig("dense", kvplug.ConfigJSON, []byte(cfg)), kvplug.ErrInvalidConfig, "")
		})
	}
	wantErr(t, kvplug.CheckConfig("dense", kvplug.ConfigBinary, []byte("not a flatbuffer")), kvplug.ErrInvalidConfig, "")
	wantErr(t, kvplug.CheckConfig("nope", kvplug.ConfigJSON, []byte(good)), kvplug.ErrNotFound, "nope")

	ctx, err := kvplug.NewContext(nil)
	if err != nil {
		t.Fatal(err)
	}
	defer ctx.Close()
	opts := kvplug.AttentionOptions{Backend: "dense", NumQHeads: 4, NumKVHeads: 2, HeadSize: 64, KVDType: kvplug.Float32}
	bad := opts
	bad.ConfigJSON = `{"backend_config_type": "DenseConfig", "backend_config": {"logits_soft_cap": -1}}`
	_, err = ctx.NewAttention(bad)
	wantErr(t, err, kvplug.ErrInvalidConfig, "logits_soft_cap")
	bad = opts
	bad.Backend = "no-such-backend"
	_, err = ctx.NewAttention(bad)
	wantErr(t, err, kvplug.ErrNotFound, "no-such-backend")
	bad = opts
	bad.HeadSize = 100
	_, err = ctx.NewAttention(bad)
	wantErr(t, err, kvplug.ErrNotSupported, "head_size=100")
	bad = opts
	bad.NumQHeads = 3
	_, err = ctx.NewAttention(bad)
	wantErr(t, err, kvplug.ErrInvalidArgument, "num_q_heads=3")
	bad = opts
	bad.ConfigJSON, bad.ConfigBinary = good, []byte{1}
	_, err = ctx.NewAttention(bad)
	wantErr(t, err, kvplug.ErrInvalidArgument, "both")
	// None of the failures above may have left a dependent counted: the context closes.
	if err := ctx.Close(); err != nil {
		t.Fatalf("context close after failed creations: %v", err)
	}
}

func TestOptionErrors(t *testing.T) {
	_, err := kvplug.NewBlockManager(kvplug.BlockManagerOptions{BlockSize: 0, NumDeviceBlocks: 4})
	wantErr(t, err, kvplug.ErrInvalidArgument, "block_size=0")
	_, err = kvplug.NewBlockManager(kvplug.BlockManagerOptions{BlockSize: 16, NumDeviceBlocks: 4, Watermark: 1.5})
	wantErr(t, err, kvplug.ErrInvalidArgument, "")
	_, err = kvplug.NewContext(&kvplug.ContextOptions{NumThreads: -1})
	wantErr(t, err, kvplug.ErrInvalidArgument, "NumThreads")

	ctx, err := kvplug.NewContext(&kvplug.ContextOptions{NumThreads: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer ctx.Close()
	good := kvplug.KvCacheOptions{NumLayers: 1, NumBlocks: 4, BlockSize: 16, NumKVHeads: 2, HeadSize: 64}
	bad := good
	bad.DType = kvplug.DType(9)
	_, err = ctx.NewKvCache(bad)
	wantErr(t, err, kvplug.ErrInvalidArgument, "dtype=9")
	bad = good
	bad.Layout = kvplug.Layout(5)
	_, err = ctx.NewKvCache(bad)
	wantErr(t, err, kvplug.ErrInvalidArgument, "layout=5")
	bad = good
	bad.NumLayers = 0
	_, err = ctx.NewKvCache(bad)
	wantErr(t, err, kvplug.ErrInvalidArgument, "")
	_, err = ctx.NewPlan(kvplug.PlanOptions{MaxNumSeqs: 0, MaxNumTokens: 1, MaxNumBlocks: 1})
	wantErr(t, err, kvplug.ErrInvalidArgument, "")
}

// Bad tensors and batches: the library's checks (shapes against the plan, dtypes against each
// other, layers against the cache) and the binding's own (slice length against shape, which C
// cannot see), each leaving the output untouched.
func TestTensorAndBatchErrors(t *testing.T) {
	e := mustEnv(t, baseConfig())
	items, err := e.raggedBatch(1)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.step(items, false); err != nil {
		t.Fatal(err)
	}
	T := 0
	for _, it := range items {
		T += it.qLen
	}
	H, D, KH := e.c.qHeads, e.c.head, e.c.kvHeads
	q := make([]float32, T*H*D)
	out := make([]float32, T*H*D)
	for i := range out {
		out[i] = 7 // sentinel: a failed call must not write
	}
	untouched := func() {
		t.Helper()
		for i, x := range out {
			if x != 7 {
				t.Fatalf("out[%d] = %v written by a failed call", i, x)
			}
		}
	}
	run := func(qt, ot kvplug.Tensor, layer int, lse []float32) error {
		return e.attn.Run(e.plan, e.cache, layer, qt, ot, lse)
	}
	f32 := kvplug.Float32Tensor
	// Shape disagreeing with the plan's token count: the library rejects it.
	err = run(f32(q[:(T-1)*H*D], T-1, H, D), f32(out[:(T-1)*H*D], T-1, H, D), 0, nil)
	wantErr(t, err, kvplug.ErrInvalidArgument, "query: expected shape")
	// Wrong head count.
	err = run(f32(q, T, H/2, 2*D), f32(out, T, H, D), 0, nil)
	wantErr(t, err, kvplug.ErrInvalidArgument, "query: expected shape")
	// Wrong ndim.
	err = run(f32(q, T*H, D), f32(out, T, H, D), 0, nil)
	wantErr(t, err, kvplug.ErrInvalidArgument, "ndim")
	// Slice shorter than the shape: caught in Go before C could read past it.
	err = run(f32(q[:len(q)-1], T, H, D), f32(out, T, H, D), 0, nil)
	wantErr(t, err, kvplug.ErrInvalidArgument, "len(data)")
	err = run(f32(q, T, H, D), f32(out, T, H, D), 0, make([]float32, T*H-1))
	wantErr(t, err, kvplug.ErrInvalidArgument, "lse")
	// Query and out of different dtypes.
	err = run(kvplug.HalfTensor(make([]uint16, T*H*D), kvplug.Float16, T, H, D), f32(out, T, H, D), 0, nil)
	wantErr(t, err, kvplug.ErrInvalidArgument, "dtype")
	// A dtype the data cannot hold, and one the ABI does not take as a tensor.
	err = run(kvplug.HalfTensor(make([]uint16, T*H*D), kvplug.Float32, T, H, D), f32(out, T, H, D), 0, nil)
	wantErr(t, err, kvplug.ErrInvalidArgument, "dtype float32 over 16-bit data")
	err = run(kvplug.HalfTensor(make([]uint16, T*H*D), kvplug.FP8E4M3, T, H, D), f32(out, T, H, D), 0, nil)
	wantErr(t, err, kvplug.ErrInvalidArgument, "is not float32")
	// Layer past the cache.
	err = run(f32(q, T, H, D), f32(out, T, H, D), e.c.layers, nil)
	wantErr(t, err, kvplug.ErrOutOfRange, "layer=2")
	untouched()

	// KV cache writes: mismatched key/value shapes, wrong slot count, slot past the cache.
	k := make([]float32, 2*KH*D)
	err = e.cache.Write(0, f32(k, 2, KH, D), f32(k[:KH*D], 1, KH, D), []int64{0, 1})
	wantErr(t, err, kvplug.ErrInvalidArgument, "shapes differ")
	err = e.cache.Write(0, f32(k, 2, KH, D), f32(k, 2, KH, D), []int64{0})
	wantErr(t, err, kvplug.ErrInvalidArgument, "slot_mapping")
	err = e.cache.Write(0, f32(k, 2, KH, D), f32(k, 2, KH, D), []int64{0, int64(e.c.numBlocks * e.c.blockSize)})
	wantErr(t, err, kvplug.ErrOutOfRange, "")

	// An attention instance reading bfloat16 caches against this float32 cache.
	bf, err := e.ctx.NewAttention(kvplug.AttentionOptions{Backend: "dense", NumQHeads: H, NumKVHeads: KH, HeadSize: D, KVDType: kvplug.BFloat16})
	if err != nil {
		t.Fatal(err)
	}
	defer bf.Close()
	err = bf.Run(e.plan, e.cache, 0, f32(q, T, H, D), f32(out, T, H, D), nil)
	wantErr(t, err, kvplug.ErrInvalidArgument, "does not match the backend")
	untouched()

	// Batches: lengths the binding checks, values the library checks, capacity.
	ok := &kvplug.Batch{BlockSize: 16, QueryStartLoc: []int32{0, 1}, SeqLens: []int32{1}, BlockTable: []int32{0}, BlockTableStride: 1}
	if err := e.plan.Update(ok); err != nil {
		t.Fatalf("valid batch: %v", err)
	}
	for name, tc := range map[string]struct {
		b      kvplug.Batch
		target error
		substr string
	}{
		"empty":           {kvplug.Batch{BlockSize: 16}, kvplug.ErrInvalidArgument, "SeqLens is empty"},
		"short qsl":       {kvplug.Batch{BlockSize: 16, QueryStartLoc: []int32{0}, SeqLens: []int32{1}, BlockTable: []int32{0}, BlockTableStride: 1}, kvplug.ErrInvalidArgument, "QueryStartLoc"},
		"short table":     {kvplug.Batch{BlockSize: 16, QueryStartLoc: []int32{0, 1, 2}, SeqLens: []int32{1, 1}, BlockTable: []int32{0}, BlockTableStride: 1}, kvplug.ErrInvalidArgument, "BlockTable"},
		"indptr past end": {kvplug.Batch{BlockSize: 16, QueryStartLoc: []int32{0, 1}, SeqLens: []int32{1}, KVIndptr: []int32{0, 5}, KVIndices: []int32{0}}, kvplug.ErrInvalidArgument, "KVIndptr[1]=5"},
		"slots mismatch":  {kvplug.Batch{BlockSize: 16, QueryStartLoc: []int32{0, 1}, SeqLens: []int32{1}, BlockTable: []int32{0}, BlockTableStride: 1, SlotMapping: []int64{0, 1}}, kvplug.ErrInvalidArgument, "SlotMapping"},
		"decreasing qsl":  {kvplug.Batch{BlockSize: 16, QueryStartLoc: []int32{0, 2, 1}, SeqLens: []int32{2, 2}, BlockTable: []int32{0, 1}, BlockTableStride: 1}, kvplug.ErrInvalidArgument, "non-decreasing"},
		"negative block":  {kvplug.Batch{BlockSize: 16, QueryStartLoc: []int32{0, 1}, SeqLens: []int32{1}, BlockTable: []int32{-1}, BlockTableStride: 1}, kvplug.ErrInvalidArgument, "< 0"},
		"over capacity":   {kvplug.Batch{BlockSize: 16, QueryStartLoc: []int32{0, 513}, SeqLens: []int32{513}, BlockTable: make([]int32, 33), BlockTableStride: 33}, kvplug.ErrOutOfRange, "max_num_tokens"},
	} {
		b := tc.b
		err := e.plan.Update(&b)
		if err == nil || !errors.Is(err, tc.target) || !strings.Contains(err.Error(), tc.substr) {
			t.Fatalf("%s: got %v, want %v mentioning %q", name, err, tc.target, tc.substr)
		}
		// A failed update empties the plan (the header's promise, kept for Go-side rejections too):
		// running on it is a precondition failure, not a run over the previous batch.
		err = e.attn.Run(e.plan, e.cache, 0, f32(q[:H*D], 1, H, D), f32(out[:H*D], 1, H, D), nil)
		wantErr(t, err, kvplug.ErrFailedPrecondition, "")
		if err := e.plan.Update(ok); err != nil {
			t.Fatal(err)
		}
	}
	untouched()
}

// Per-device capabilities: dense on the CPU takes head size 128 and every optional output; the CPU
// entry of every backend agrees with GetBackendInfo (whose head sizes are the CPU's); the device
// mask says which devices report available; bad arguments are typed errors naming the value.
func TestBackendDeviceInfo(t *testing.T) {
	cpu, err := kvplug.GetBackendDeviceInfo("dense", kvplug.DeviceCPU)
	if err != nil {
		t.Fatal(err)
	}
	if cpu.Device != kvplug.DeviceCPU || !cpu.Available || !cpu.SupportsHeadSize(128) || cpu.SupportsHeadSize(100) ||
		!cpu.SupportsDType(kvplug.Float32) || !cpu.SupportsDType(kvplug.BFloat16) || cpu.SupportsDType(kvplug.FP8E4M3) ||
		!cpu.SupportsLSE || !cpu.SupportsEntropy || cpu.NeedsStateSlots || cpu.Experimental {
		t.Fatalf("dense on the CPU: %+v", cpu)
	}
	names, err := kvplug.Backends()
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range names {
		info, err := kvplug.GetBackendInfo(name)
		if err != nil {
			t.Fatal(err)
		}
		c, err := kvplug.GetBackendDeviceInfo(name, kvplug.DeviceCPU)
		if err != nil {
			t.Fatal(err)
		}
		if fmt.Sprint(c.HeadSizes) != fmt.Sprint(info.HeadSizes) || c.SupportsLSE != info.SupportsLSE ||
			c.NeedsStateSlots != info.NeedsStateSlots {
			t.Errorf("%s: CPU device info %+v disagrees with backend info %+v", name, c, info)
		}
		for _, dev := range []kvplug.Device{kvplug.DeviceCPU, kvplug.DeviceCUDA} {
			d, err := kvplug.GetBackendDeviceInfo(name, dev)
			if err != nil {
				t.Fatal(err)
			}
			inMask := info.DeviceMask&(1<<uint(dev)) != 0
			if d.Device != dev || d.Available != inMask || d.DTypeMask&^info.DTypeMask != 0 {
				t.Errorf("%s on %v: %+v, backend info device mask %#x dtype mask %#x", name, dev, d, info.DeviceMask, info.DTypeMask)
			}
			if !d.Available && (d.DTypeMask != 0 || len(d.HeadSizes) != 0) {
				t.Errorf("%s on %v: unavailable but lists capabilities: %+v", name, dev, d)
			}
		}
	}
	if strings.Contains(kvplug.VersionString(), "(cpu)") {
		if g, err := kvplug.GetBackendDeviceInfo("dense", kvplug.DeviceCUDA); err != nil || g.Available {
			t.Fatalf("CUDA on a CPU-only build: %+v, %v; want available = false and no error", g, err)
		}
	}
	_, err = kvplug.GetBackendDeviceInfo("no-such-backend", kvplug.DeviceCPU)
	wantErr(t, err, kvplug.ErrNotFound, "no-such-backend")
	_, err = kvplug.GetBackendDeviceInfo("dense", kvplug.Device(3))
	wantErr(t, err, kvplug.ErrInvalidArgument, "device_type=3")
	if kvplug.DeviceCUDA.String() != "cuda" || kvplug.Device(3).String() != "Device(3)" {
		t.Fatalf("Device names: %v, %v", kvplug.DeviceCUDA, kvplug.Device(3))
	}
}
