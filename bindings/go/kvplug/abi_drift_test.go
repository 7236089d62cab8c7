package kvplug

import (
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// unboundFunctions are header functions this package deliberately does not call, with the reason.
var unboundFunctions = map[string]string{
	"kvp_context_set_stream":           "CPU-only binding: there is no stream to set",
	"kvp_kv_cache_create_from_tensors": "a cache over Go memory would let C keep Go pointers (cgo's rules)",
	"kvp_attention_run":                "Attention.Run goes through kvp_attention_run_v2",
}

// headerText is kvplug.h with comments and preprocessor lines removed, whitespace collapsed.
func headerText(t *testing.T) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("..", "..", "..", "abi", "include", "kvplug", "kvplug.h"))
	if err != nil {
		t.Fatal(err)
	}
	text := regexp.MustCompile(`(?s)/\*.*?\*/`).ReplaceAllString(string(b), " ")
	var code []string
	cont := false
	for _, line := range strings.Split(text, "\n") {
		s := strings.TrimSpace(line)
		if cont || strings.HasPrefix(s, "#") {
			cont = strings.HasSuffix(s, "\\")
			continue
		}
		code = append(code, line)
	}
	return strings.Join(strings.Fields(strings.Join(code, " ")), " ")
}

var lastIdent = regexp.MustCompile(`(\w+)\s*$`)

func parseFunctions(flat string) []string {
	var out []string
	for _, m := range regexp.MustCompile(`KVP_API ([^(]*)\(`).FindAllStringSubmatch(flat, -1) {
		out = append(out, lastIdent.FindStringSubmatch(m[1])[1])
	}
	return out
}

func parseStructs(flat string) map[string][]string {
	out := map[string][]string{}
	for _, m := range regexp.MustCompile(`typedef struct (\w+) \{(.*?)\}`).FindAllStringSubmatch(flat, -1) {
		var fields []string
		for _, f := range strings.Split(m[2], ";") {
			if f = strings.TrimSpace(f); f != "" {
				fields = append(fields, lastIdent.FindStringSubmatch(f)[1])
			}
		}
		out[m[1]] = fields
	}
	return out
}

// The header declares exactly the functions of the snapshot, in order, and the package calls each
// of them (in Go or in kvplug_go.h) unless it is listed as deliberately unbound.
func TestHeaderFunctionsMatchTheBinding(t *testing.T) {
	got := parseFunctions(headerText(t))
	if len(got) < 50 {
		t.Fatalf("header parse looks wrong: %v", got)
	}
	if strings.Join(got, ",") != strings.Join(headerFunctions, ",") {
		t.Errorf("the header's functions differ from the binding's snapshot:\n header:  %v\n binding: %v", got, headerFunctions)
	}
	var src strings.Builder
	files, _ := filepath.Glob("*.go")
	files = append(files, "kvplug_go.h")
	for _, f := range files {
		if strings.HasSuffix(f, "_test.go") || f == "abi_layout.go" {
			continue
		}
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		src.Write(b)
	}
	for _, f := range got {
		called := regexp.MustCompile(`\b` + f + `\(`).MatchString(src.String())
		if _, skip := unboundFunctions[f]; skip == called {
			t.Errorf("%s: called=%v but listed as unbound=%v", f, called, skip)
		}
	}
}

// Every struct of the header has the snapshot's fields in order at the snapshot's offsets and
// sizes, as cgo compiled them: a new, removed, moved or resized field fails here.
func TestHeaderStructsMatchTheBinding(t *testing.T) {
	header := parseStructs(headerText(t))
	if len(header) != len(headerStructs) {
		t.Errorf("the header has %d structs, the snapshot %d", len(header), len(headerStructs))
	}
	compiled := map[string]structLayout{}
	for _, s := range compiledStructs() {
		compiled[s.name] = s
	}
	for _, s := range headerStructs {
		fields, ok := header[s.name]
		if !ok {
			t.Errorf("struct %s is in the snapshot but not in the header", s.name)
			continue
		}
		var names []string
		for _, f := range s.fields {
			names = append(names, f.name)
		}
		if strings.Join(fields, ",") != strings.Join(names, ",") {
			t.Errorf("struct %s: header fields %v, snapshot %v", s.name, fields, names)
		}
		c := compiled[s.name]
		if c.size != s.size {
			t.Errorf("struct %s: sizeof %d, snapshot %d", s.name, c.size, s.size)
		}
		for i, f := range s.fields {
			if i < len(c.fields) && c.fields[i] != f {
				t.Errorf("struct %s field %s: compiled offset/size %d/%d, snapshot %d/%d", s.name, f.name,
					c.fields[i].offset, c.fields[i].size, f.offset, f.size)
			}
		}
	}
}

// The ABI 0.4 additions are in the snapshot: kvp_batch's two trailing fields, the comm options,
// the Star layout, kvp_attention_outputs' entropy_summary and the new functions.
func TestABI04Additions(t *testing.T) {
	if HeaderVersionMinor < 4 || NCCLUniqueIDBytes != 128 {
		t.Fatalf("header %d.%d, NCCL id %d bytes", HeaderVersionMajor, HeaderVersionMinor, NCCLUniqueIDBytes)
	}
	want := map[string][]string{
		"kvp_batch":             {"context_lens", "query_pos_starts"},
		"kvp_comm_options":      {"validate_each_call"},
		"kvp_star_layout":       {"anchor_size"},
		"kvp_attention_outputs": {"entropy", "entropy_summary"},
	}
	for _, s := range headerStructs {
		if w, ok := want[s.name]; ok {
			tail := s.fields[len(s.fields)-len(w):]
			for i := range w {
				if tail[i].name != w[i] {
					t.Errorf("%s ends with %v, want %v", s.name, tail, w)
				}
			}
			delete(want, s.name)
		}
	}
	if len(want) != 0 {
		t.Errorf("missing structs %v", want)
	}
	fns := strings.Join(headerFunctions, ",")
	for _, f := range []string{"kvp_comm_nccl_unique_id", "kvp_comm_create", "kvp_comm_destroy", "kvp_comm_merge_attention",
		"kvp_comm_pending", "kvp_block_manager_allocate_star"} {
		if !strings.Contains(fns, f) {
			t.Errorf("the snapshot lacks %s", f)
		}
	}
}

// The ABI 0.5 additions are in the snapshot, in header order: kvp_cache_layout, kvp_ssm_args and
// the two functions right after kvp_attention_state_bytes.
func TestABI05Additions(t *testing.T) {
	if HeaderVersionMinor < 5 {
		t.Fatalf("header %d.%d, want 0.5 or newer", HeaderVersionMajor, HeaderVersionMinor)
	}
	want := map[string]string{
		"kvp_cache_layout": "struct_size,seq_len,num_pages,compressed_rows,compressed_pages,stable_rows,window_first_page,window_pages",
		"kvp_ssm_args":     "struct_size,which,in,conv_weight,conv_bias,dt_bias,a_log,d_skip,norm_weight,out",
	}
	for _, s := range headerStructs {
		if w, ok := want[s.name]; ok {
			var names []string
			for _, f := range s.fields {
				names = append(names, f.name)
			}
			if strings.Join(names, ",") != w {
				t.Errorf("%s: %v, want %s", s.name, names, w)
			}
			delete(want, s.name)
		}
	}
	if len(want) != 0 {
		t.Errorf("missing structs %v", want)
	}
	fns := strings.Join(headerFunctions, ",")
	if !strings.Contains(fns, "kvp_attention_state_bytes,kvp_attention_cache_layout,kvp_attention_ssm,") {
		t.Errorf("the snapshot lacks the 0.5 functions after kvp_attention_state_bytes: %s", fns)
	}
}

// The parsers catch edits: a copy of the header with an added field and a removed function.
func TestDriftParsersCatchEdits(t *testing.T) {
	flat := headerText(t)
	edited := strings.Replace(flat, "const int32_t* query_pos_starts;", "const int32_t* query_pos_starts; int32_t flags;", 1)
	if f := parseStructs(edited)["kvp_batch"]; f[len(f)-1] != "flags" {
		t.Errorf("added field not seen: %v", f)
	}
	edited = strings.Replace(flat, "DLTensor* entropy_summary;", "", 1)
	if f := parseStructs(edited)["kvp_attention_outputs"]; len(f) != 4 || f[len(f)-1] != "entropy" {
		t.Errorf("removed trailing field not seen: %v", f)
	}
	edited = strings.Replace(flat, "const DLTensor* in;", "const DLTensor* input;", 1)
	if f := parseStructs(edited)["kvp_ssm_args"]; len(f) != 10 || f[2] != "input" {
		t.Errorf("renamed 0.5 field not seen: %v", f)
	}
	edited = strings.Replace(flat, "KVP_API kvp_status kvp_attention_ssm(", "kvp_status kvp_attention_ssm(", 1)
	if len(parseFunctions(edited)) != len(headerFunctions)-1 {
		t.Error("removed 0.5 function not seen")
	}
	edited = strings.Replace(flat, "KVP_API kvp_status kvp_comm_pending(", "kvp_status kvp_comm_pending(", 1)
	if len(parseFunctions(edited)) != len(headerFunctions)-1 {
		t.Error("removed function not seen")
	}
}
