package kvplug_test

import (
	"fmt"
	"math"
	"strings"
	"testing"

	"kvplug.dev/kvplug/kvplug"
)

// ABI 0.4: the "entropy" backend (entropy-guided attention) on the CPU and Outputs.EntropySummary.
// Everything is checked against attention computed here in float64 from the test's own
// probabilities: logits q.k / (t[h, p] sqrt(d)) with a [num_q_heads, T] temperature table
// (positions >= T use the last entry), out, lse, each row's entropy -sum a ln a, and the per-head
// summary {rows, mean H, informative rows, mean H / E_max, collapse rows, overload rows}.

const (
	enHQ, enHK, enD, enPage = 4, 2, 64, 8
)

// A ragged step: a 12-token prefill (positions 0..11: inside and past a table of 8), a 9-token chunk
// after 21 cached tokens, a decode at position 16, a one-token sequence (one key: counted, not
// informative) and 3 tokens after 42 cached.
var (
	enSeqLens = []int{12, 30, 17, 1, 45}
	enQLens   = []int{12, 9, 1, 1, 3}
)

// enVal is K (which 0), V (1) or Q (2) of sequence b at pos; Q is scaled so that t = 1 gives logits
// neither flat nor one-hot.
func enVal(b, pos, h, x, which int) float32 {
	v := math.Sin(float64(b*7919+pos*131+h*17+x*7+which*1009)*0.37) * math.Cos(float64(pos+x*which+b+1)*0.11)
	if which == 2 {
		v *= 6
	}
	return float32(v)
}

// enTable is [enHQ * positions]: head 0 cold (collapse), head 3 hot (overload), heads 1 and 2
// across both bands and between; neighbouring entries differ, so the position matters.
func enTable(positions int) []float32 {
	t := make([]float32, 0, enHQ*positions)
	for h := 0; h < enHQ; h++ {
		for p := 0; p < positions; p++ {
			fp := float32(p)
			switch h {
			case 0:
				t = append(t, 0.05+0.005*fp)
			case 1:
				t = append(t, 0.25+0.05*fp)
			case 2:
				t = append(t, 1.2-0.1*float32(p%10))
			default:
				t = append(t, 20+fp)
			}
		}
	}
	return t
}

func entropyJSON(temperature []float32) string {
	list := make([]string, len(temperature))
	for i, t := range temperature {
		list[i] = fmt.Sprint(t)
	}
	return `{"backend_config_type": "EntropyConfig", "backend_config": {"temperature": [` + strings.Join(list, ", ") + `]}}`
}

type entropyFixture struct {
	ctx    *kvplug.Context
	q      []float32
	qsl    []int32
	lens   []int32
	table  []int32
	stride int
	pages  int
}

func newEntropyFixture(t *testing.T) *entropyFixture {
	t.Helper()
	f := &entropyFixture{ctx: newMergeContext(t), qsl: []int32{0}}
	for b, n := range enSeqLens {
		f.qsl = append(f.qsl, f.qsl[b]+int32(enQLens[b]))
		f.lens = append(f.lens, int32(n))
		for pos := n - enQLens[b]; pos < n; pos++ {
			for h := 0; h < enHQ; h++ {
				for x := 0; x < enD; x++ {
					f.q = append(f.q, enVal(b, pos, h, x, 2))
				}
			}
		}
		f.pages += (n + enPage - 1) / enPage
		if (n+enPage-1)/enPage > f.stride {
			f.stride = (n + enPage - 1) / enPage
		}
	}
	// Pages handed out from the top down: no sequence's pages are in order.
	f.table = make([]int32, len(enSeqLens)*f.stride)
	next := f.pages
	for b, n := range enSeqLens {
		for j := range f.table[b*f.stride : (b+1)*f.stride] {
			f.table[b*f.stride+j] = -1
			if j < (n+enPage-1)/enPage {
				next--
				f.table[b*f.stride+j] = int32(next)
			}
		}
	}
	return f
}

func (f *entropyFixture) tokens() int { return int(f.qsl[len(f.qsl)-1]) }

type entropyRun struct {
	out, lse, ent, summary []float32
}

// run creates backend with config and runs it over the step, asking for the entropy and the
// summary as the flags say; what is not asked for stays NaN.
func (f *entropyFixture) run(backend, config string, entropy, summary bool) (entropyRun, error) {
	nan := func(n int) []float32 {
		s := make([]float32, n)
		for i := range s {
			s[i] = float32(math.NaN())
		}
		return s
	}
	T := f.tokens()
	r := entropyRun{nan(T * enHQ * enD), nan(T * enHQ), nan(T * enHQ), nan(enHQ * kvplug.EntropySummaryFields)}
	cache, err := f.ctx.NewKvCache(kvplug.KvCacheOptions{NumLayers: 1, NumBlocks: f.pages, BlockSize: enPage,
		NumKVHeads: enHK, HeadSize: enD, DType: kvplug.Float32})
	if err != nil {
		return r, err
	}
	defer cache.Close()
	for b, n := range enSeqLens {
		var k, v []float32
		slots := make([]int64, n)
		for pos := 0; pos < n; pos++ {
			for g := 0; g < enHK; g++ {
				for x := 0; x < enD; x++ {
					k, v = append(k, enVal(b, pos, g, x, 0)), append(v, enVal(b, pos, g, x, 1))
				}
			}
			slots[pos] = int64(f.table[b*f.stride+pos/enPage])*enPage + int64(pos%enPage)
		}
		if err := cache.Write(0, kvplug.Float32Tensor(k, n, enHK, enD), kvplug.Float32Tensor(v, n, enHK, enD), slots); err != nil {
			return r, err
		}
	}
	attn, err := f.ctx.NewAttention(kvplug.AttentionOptions{Backend: backend, NumQHeads: enHQ, NumKVHeads: enHK,
		HeadSize: enD, KVDType: kvplug.Float32, ConfigJSON: config})
	if err != nil {
		return r, err
	}
	defer attn.Close()
	plan, err := f.ctx.NewPlan(kvplug.PlanOptions{MaxNumSeqs: 8, MaxNumTokens: 64, MaxNumBlocks: 32})
	if err != nil {
		return r, err
	}
	defer plan.Close()
	if err := plan.Update(&kvplug.Batch{BlockSize: enPage, QueryStartLoc: f.qsl, SeqLens: f.lens, BlockTable: f.table,
		BlockTableStride: f.stride}); err != nil {
		return r, err
	}
	o := kvplug.Outputs{Out: kvplug.Float32Tensor(r.out, T, enHQ, enD), LSE: r.lse}
	if entropy {
		o.Entropy = r.ent
	}
	if summary {
		o.EntropySummary = r.summary
	}
	return r, attn.RunWith(plan, cache, 0, kvplug.Float32Tensor(f.q, T, enHQ, enD), o)
}

type entropyRef struct {
	out, lse, ent []float64
	keys          []int // keys each row saw
}

func entropyReference(temp func(h, pos int) float64) entropyRef {
	var r entropyRef
	scale := 1 / math.Sqrt(enD)
	for b, n := range enSeqLens {
		for pos := n - enQLens[b]; pos < n; pos++ {
			r.keys = append(r.keys, pos+1)
			for h := 0; h < enHQ; h++ {
				g := h / (enHQ / enHK)
				logits := make([]float64, pos+1)
				m := math.Inf(-1)
				for j := range logits {
					dot := 0.0
					for x := 0; x < enD; x++ {
						dot += float64(enVal(b, pos, h, x, 2)) * float64(enVal(b, j, g, x, 0))
					}
					logits[j] = dot * scale / temp(h, pos)
					m = math.Max(m, logits[j])
				}
				z := 0.0
				for _, l := range logits {
					z += math.Exp(l - m)
				}
				out := make([]float64, enD)
				ent := 0.0
				for j, l := range logits {
					a := math.Exp(l-m) / z
					if a > 0 {
						ent -= a * math.Log(a)
					}
					for x := range out {
						out[x] += a * float64(enVal(b, j, g, x, 1))
					}
				}
				r.out, r.lse, r.ent = append(r.out, out...), append(r.lse, m+math.Log(z)), append(r.ent, ent)
			}
		}
	}
	return r
}

// entropySummary is the reference summary of ent ([rows, enHQ]) and, per head, the rows within
// 1e-4 of a band edge (whose band a float32 kernel may legitimately call otherwise).
func entropySummary(ent []float64, keys []int) ([][6]float64, []int) {
	s, near := make([][6]float64, enHQ), make([]int, enHQ)
	for row, n := range keys {
		for h := 0; h < enHQ; h++ {
			e := ent[row*enHQ+h]
			if n == 0 {
				continue
			}
			s[h][0]++
			s[h][1] += e
			if n < 2 {
				continue
			}
			eMax := math.Log(float64(n))
			s[h][2]++
			s[h][3] += e / eMax
			if e <= eMax/4 {
				s[h][4]++
			}
			if e >= 3*eMax/4 {
				s[h][5]++
			}
			if math.Abs(e-eMax/4) < 1e-4 || math.Abs(e-3*eMax/4) < 1e-4 {
				near[h]++
			}
		}
	}
	for h := range s {
		if s[h][0] > 0 {
			s[h][1] /= s[h][0]
		}
		if s[h][2] > 0 {
			s[h][3] /= s[h][2]
		}
	}
	return s, near
}

func checkEntropySummary(t *testing.T, what string, got []float32, ref entropyRef) {
	t.Helper()
	want, near := entropySummary(ref.ent, ref.keys)
	heads := kvplug.ParseEntropySummary(got)
	if len(heads) != enHQ {
		t.Fatalf("%s: %d heads", what, len(heads))
	}
	for h, g := range heads {
		w, slack := want[h], float64(near[h])
		if float64(g.Rows) != w[0] || float64(g.InformativeRows) != w[2] ||
			math.Abs(float64(g.MeanEntropy)-w[1]) > 2e-5 || math.Abs(float64(g.MeanNormalizedEntropy)-w[3]) > 2e-5 ||
			math.Abs(float64(g.CollapseRows)-w[4]) > slack || math.Abs(float64(g.OverloadRows)-w[5]) > slack {
			t.Errorf("%s: head %d summary %+v, reference %v (%d rows near a band edge)", what, h, g, w, near[h])
		}
	}
}

func TestEntropyRegistered(t *testing.T) {
	names, err := kvplug.Backends()
	if err != nil {
		t.Fatal(err)
	}
	seen := map[string]int{}
	for _, n := range names {
		seen[n]++
	}
	for _, want := range []string{"dense", "star", "entropy"} {
		if seen[want] != 1 {
			t.Errorf("%s listed %d times in %v", want, seen[want], names)
		}
	}
	info, err := kvplug.GetBackendDeviceInfo("entropy", kvplug.DeviceCPU)
	if err != nil || !info.Available || !info.SupportsLSE || !info.SupportsEntropy || info.NeedsStateSlots ||
		!info.SupportsHeadSize(enD) || !info.SupportsDType(kvplug.Float32) {
		t.Fatalf("entropy on the CPU: %+v, %v", info, err)
	}
}

func TestEntropyTemperatureTables(t *testing.T) {
	f := newEntropyFixture(t)
	// T = 1: per head only; T = 8: most positions lie past the table; T = 64: all inside it.
	for _, positions := range []int{1, 8, 64} {
		what := fmt.Sprintf("T=%d", positions)
		table := enTable(positions)
		cfg := entropyJSON(table)
		if err := kvplug.CheckConfig("entropy", kvplug.ConfigJSON, []byte(cfg)); err != nil {
			t.Fatal(err)
		}
		got, err := f.run("entropy", cfg, true, true)
		if err != nil {
			t.Fatal(err)
		}
		temp := func(h, pos int) float64 {
			if pos >= positions {
				pos = positions - 1
			}
			return float64(table[h*positions+pos])
		}
		ref := entropyReference(temp)
		eo, el, ee := maxDiff(got.out, ref.out), maxDiff(got.lse, ref.lse), maxDiff(got.ent, ref.ent)
		if !(eo < 2e-5 && el < 5e-5 && ee < 5e-5) {
			t.Fatalf("%s: max err out %g, lse %g, entropy %g", what, eo, el, ee)
		}
		checkEntropySummary(t, what, got.summary, ref)

		heads := kvplug.ParseEntropySummary(got.summary)
		if heads[0].CollapseRows < 10 || heads[3].OverloadRows < 10 || heads[1].Rows != f.tokens() ||
			heads[1].InformativeRows != f.tokens()-2 {
			t.Errorf("%s: the summary looks degenerate: %+v", what, heads)
		}
		// The table's indexing is what the outputs depend on: other readings are far off.
		if positions > 1 {
			perHead := entropyReference(func(h, _ int) float64 { return float64(table[h*positions]) })
			if maxDiff(got.out, perHead.out) < 1e-3 {
				t.Errorf("%s: the position does not matter", what)
			}
		}
		if positions == 8 {
			first := entropyReference(func(h, pos int) float64 {
				if pos >= positions {
					pos = 0
				}
				return float64(table[h*positions+pos])
			})
			wrap := entropyReference(func(h, pos int) float64 { return float64(table[h*positions+pos%positions]) })
			if maxDiff(got.out, first.out) < 1e-3 || maxDiff(got.out, wrap.out) < 1e-3 {
				t.Errorf("%s: positions past the table do not use the last entry", what)
			}
		}
	}
}

// Unit or empty tables are dense, bit for bit, telemetry included; dense's telemetry matches the
// reference; the summary alone equals the summary next to the entropy.
func TestEntropyUnitTablesAndSummaryAlone(t *testing.T) {
	f := newEntropyFixture(t)
	dense, err := f.run("dense", "", true, true)
	if err != nil {
		t.Fatal(err)
	}
	ones := make([]float32, enHQ*5)
	for i := range ones {
		ones[i] = 1
	}
	for _, cfg := range []string{"", entropyJSON(ones[:enHQ]), entropyJSON(ones), entropyJSON(nil)} {
		got, err := f.run("entropy", cfg, true, true)
		if err != nil {
			t.Fatal(err)
		}
		if fmt.Sprint(got) != fmt.Sprint(dense) {
			t.Errorf("config %q: differs from dense", cfg)
		}
	}
	ref := entropyReference(func(int, int) float64 { return 1 })
	if d := maxDiff(dense.ent, ref.ent); !(d < 5e-5) {
		t.Errorf("dense entropy: max err %g", d)
	}
	checkEntropySummary(t, "dense", dense.summary, ref)

	cfg := entropyJSON(enTable(8))
	both, err := f.run("entropy", cfg, true, true)
	if err != nil {
		t.Fatal(err)
	}
	alone, err := f.run("entropy", cfg, false, true)
	if err != nil {
		t.Fatal(err)
	}
	none, err := f.run("entropy", cfg, true, false)
	if err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(alone.summary) != fmt.Sprint(both.summary) || fmt.Sprint(alone.out) != fmt.Sprint(both.out) ||
		!math.IsNaN(float64(alone.ent[0])) || !math.IsNaN(float64(none.summary[0])) ||
		fmt.Sprint(none.ent) != fmt.Sprint(both.ent) {
		t.Errorf("asking for the summary or the entropy alone changes what is written")
	}
}

func TestEntropyBadTemperatures(t *testing.T) {
	f := newEntropyFixture(t)
	// Values: refused when the config is parsed, by CheckConfig and NewAttention alike.
	for _, c := range []struct{ table, want string }{
		{"[1, 0, 1, 1]", "temperature[1]=0"},
		{"[1, 1, -0.5, 1]", "temperature[2]=-0.5"},
		{"[1, 1, 1, 1, 1, 1, 1, -2]", "temperature[7]=-2"},
		{"[nan, 1, 1, 1]", "temperature[0]"},
		{"[1, 1, 1, inf]", "temperature[3]"},
	} {
		cfg := `{"backend_config_type": "EntropyConfig", "backend_config": {"temperature": ` + c.table + `}}`
		wantErr(t, kvplug.CheckConfig("entropy", kvplug.ConfigJSON, []byte(cfg)), kvplug.ErrInvalidConfig, c.want)
		_, err := f.ctx.NewAttention(kvplug.AttentionOptions{Backend: "entropy", NumQHeads: enHQ, NumKVHeads: enHK,
			HeadSize: enD, KVDType: kvplug.Float32, ConfigJSON: cfg})
		wantErr(t, err, kvplug.ErrInvalidConfig, c.want)
	}
	// The table's shape needs num_q_heads, which only creation knows; so does the reciprocal of a
	// subnormal temperature (finite and > 0 as parsed, 1/t overflows).
	for _, c := range []struct {
		table []float32
		want  string
	}{
		{[]float32{1, 1, 1}, "3 entries, not a multiple of num_q_heads=4"},
		{[]float32{1, 1, 1, 1, 1}, "5 entries"},
		{[]float32{1, 1, 1e-39, 1}, "temperature[2]"},
	} {
		cfg := entropyJSON(c.table)
		if err := kvplug.CheckConfig("entropy", kvplug.ConfigJSON, []byte(cfg)); err != nil {
			t.Fatalf("%v: %v", c.table, err)
		}
		_, err := f.run("entropy", cfg, false, false)
		wantErr(t, err, kvplug.ErrInvalidArgument, c.want)
	}
	// Another backend's config type, either way round.
	wantErr(t, kvplug.CheckConfig("entropy", kvplug.ConfigJSON, []byte(`{"backend_config_type": "DenseConfig", "backend_config": {}}`)),
		kvplug.ErrInvalidConfig, "")
	wantErr(t, kvplug.CheckConfig("dense", kvplug.ConfigJSON, []byte(entropyJSON([]float32{1, 1, 1, 1}))), kvplug.ErrInvalidConfig, "")
}

func TestEntropySummaryErrors(t *testing.T) {
	f := newEntropyFixture(t)
	T := f.tokens()
	cache, err := f.ctx.NewKvCache(kvplug.KvCacheOptions{NumLayers: 1, NumBlocks: f.pages, BlockSize: enPage,
		NumKVHeads: enHK, HeadSize: enD, DType: kvplug.Float32})
	if err != nil {
		t.Fatal(err)
	}
	defer cache.Close()
	attn, err := f.ctx.NewAttention(kvplug.AttentionOptions{Backend: "entropy", NumQHeads: enHQ, NumKVHeads: enHK,
		HeadSize: enD, KVDType: kvplug.Float32, ConfigJSON: entropyJSON(enTable(8))})
	if err != nil {
		t.Fatal(err)
	}
	defer attn.Close()
	plan, err := f.ctx.NewPlan(kvplug.PlanOptions{MaxNumSeqs: 8, MaxNumTokens: 64, MaxNumBlocks: 32})
	if err != nil {
		t.Fatal(err)
	}
	defer plan.Close()
	if err := plan.Update(&kvplug.Batch{BlockSize: enPage, QueryStartLoc: f.qsl, SeqLens: f.lens, BlockTable: f.table,
		BlockTableStride: f.stride}); err != nil {
		t.Fatal(err)
	}
	out, lse, ent := make([]float32, T*enHQ*enD), make([]float32, T*enHQ), make([]float32, T*enHQ)
	for _, s := range [][]float32{out, lse, ent} {
		for i := range s {
			s[i] = -3
		}
	}
	q := kvplug.Float32Tensor(f.q, T, enHQ, enD)
	for _, c := range []struct {
		name string
		o    kvplug.Outputs
		want string
	}{
		{"5 fields", kvplug.Outputs{Out: kvplug.Float32Tensor(out, T, enHQ, enD), EntropySummary: ent[:enHQ*5]}, "entropy_summary: len(data)=20"},
		{"one head too many", kvplug.Outputs{Out: kvplug.Float32Tensor(out, T, enHQ, enD), EntropySummary: ent[:(enHQ+1)*6]}, "entropy_summary: len(data)=30"},
		{"summary in entropy", kvplug.Outputs{Out: kvplug.Float32Tensor(out, T, enHQ, enD), Entropy: ent, EntropySummary: ent[:enHQ*6]}, "entropy_summary"},
		{"summary in lse", kvplug.Outputs{Out: kvplug.Float32Tensor(out, T, enHQ, enD), LSE: lse, EntropySummary: lse[8 : 8+enHQ*6]}, "entropy_summary"},
		{"summary in out", kvplug.Outputs{Out: kvplug.Float32Tensor(out, T, enHQ, enD), EntropySummary: out[:enHQ*6]}, "entropy_summary"},
		{"2-d query", kvplug.Outputs{Out: kvplug.Float32Tensor(out, T, enHQ, enD), EntropySummary: make([]float32, enHQ*6)}, "query: ndim=2"},
	} {
		query := q
		if c.name == "2-d query" {
			query = kvplug.Float32Tensor(f.q, T*enHQ, enD)
		}
		wantErr(t, attn.RunWith(plan, cache, 0, query, c.o), kvplug.ErrInvalidArgument, c.want)
		for _, s := range [][]float32{out, lse, ent} {
			for i, x := range s {
				if x != -3 {
					t.Fatalf("%s: a failed run wrote [%d] = %g", c.name, i, x)
				}
			}
		}
	}
	summary := make([]float32, enHQ*6)
	if err := attn.RunWith(plan, cache, 0, q, kvplug.Outputs{Out: kvplug.Float32Tensor(out, T, enHQ, enD), EntropySummary: summary}); err != nil {
		t.Fatal(err)
	}
	if h := kvplug.ParseEntropySummary(summary); h[2].Rows != T {
		t.Fatalf("summary %+v", h)
	}
}

func TestParseEntropySummary(t *testing.T) {
	heads := kvplug.ParseEntropySummary([]float32{3, 0.5, 2, 0.25, 1, 0, 7, 1.5, 7, 0.8, 0, 6, 9})
	want := []kvplug.HeadEntropy{{Rows: 3, MeanEntropy: 0.5, InformativeRows: 2, MeanNormalizedEntropy: 0.25, CollapseRows: 1},
		{Rows: 7, MeanEntropy: 1.5, InformativeRows: 7, MeanNormalizedEntropy: 0.8, OverloadRows: 6}}
	if fmt.Sprint(heads) != fmt.Sprint(want) {
		t.Fatalf("got %+v, want %+v (the trailing partial row ignored)", heads, want)
	}
}
