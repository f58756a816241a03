package main

import (
	"context"
	"encoding/json"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/kmsd-project/kmsd/api/client"
)

// TestGaloisKeysOnDemand: kmsd-mcp serves a key made without any
// rotation. he_linear needs some: kmsd-mcp asks kmsd for exactly those
// (kmsd generates them and lists them in the version's signed extension),
// loads only them, and the result decrypts to W·x. A second call of the
// same shape asks for nothing more; with --no-galois-on-demand a server
// asks for nothing and the call is refused, naming the rotation.
func TestGaloisKeysOnDemand(t *testing.T) {
	w := newWorld(t)
	if _, err := w.adminc.CreateKey(context.Background(), client.CreateKeyRequest{Name: "bare", Kind: "ckks",
		Policy: &client.Policy{Params: json.RawMessage(`"ckks-logn13"`), DecryptLogPrecision: 30, DecryptBudget: 16}}); err != nil {
		t.Fatal(err)
	}
	url := w.startHTTP(t, "--key", "bare")
	s := connectHTTP(t, url, w.token(t, "worker", "bare"))
	k := w.keysFor(t, "bare", 1)
	x := []float64{0.5, -1, 2}
	env := w.encrypt(t, k, x)
	W := [][]float64{{1, 2, 3}, {-1, 0, 0.5}}
	out, msg := call(t, s, "he_linear", map[string]any{"ciphertext": envJSON(env), "weights": W})
	if msg != "" {
		t.Fatal(msg)
	}
	w.decrypt(t, "he_linear with on-demand keys", out, []float64{0.5 - 2 + 6, -0.5 + 1})
	// np = 4 on 4096 slots: the replication's 4..2048 (10 rotations),
	// baby steps by 1 and giant steps by 2.
	want := []int{1, 2}
	for p := 4; p < 4096; p *= 2 {
		want = append(want, p)
	}
	slices.Sort(want)
	ext, err := w.adminc.Extension(context.Background(), "bare", 1)
	if err != nil {
		t.Fatal(err)
	}
	var doc struct {
		Sequence   uint64 `json:"sequence"`
		GaloisKeys []struct {
			GaloisElement uint64 `json:"galois_element"`
		} `json:"galois_keys"`
	}
	if err := json.Unmarshal(ext.Document, &doc); err != nil {
		t.Fatal(err)
	}
	if len(doc.GaloisKeys) != len(want) || doc.Sequence != 1 {
		t.Fatalf("kmsd made %d keys in %d extensions, want the %d the call needs in one", len(doc.GaloisKeys), doc.Sequence, len(want))
	}
	// he_describe lists them as the version's rotations.
	d, msg := call(t, s, "he_describe", map[string]any{})
	if msg != "" {
		t.Fatal(msg)
	}
	b, _ := json.Marshal(d["keys"])
	var keys []KeyInfoJSON
	_ = json.Unmarshal(b, &keys)
	if len(keys) != 1 || len(keys[0].Versions) != 1 || !slices.Equal(keys[0].Versions[0].Rotations, want) {
		t.Fatalf("he_describe: %s", b)
	}
	// The same shape again: no new extension.
	if _, msg := call(t, s, "he_linear", map[string]any{"ciphertext": envJSON(env), "weights": W}); msg != "" {
		t.Fatal(msg)
	}
	if ext2, _ := w.adminc.Extension(context.Background(), "bare", 1); string(ext2.Document) != string(ext.Document) {
		t.Fatal("a second call of the same shape changed the extension")
	}
	// A server that does not ask: a shape needing rotations the version
	// lacks (np = 8 needs rotation 8's... all present; 1x1 needs none) is
	// refused naming the missing one.
	if _, err := w.adminc.CreateKey(context.Background(), client.CreateKeyRequest{Name: "bare2", Kind: "ckks",
		Policy: &client.Policy{Params: json.RawMessage(`"ckks-logn13"`), DecryptBudget: 16}}); err != nil {
		t.Fatal(err)
	}
	url2 := w.startHTTP(t, "--key", "bare2", "--no-galois-on-demand")
	s2 := connectHTTP(t, url2, w.token(t, "worker", "bare2"))
	env2 := w.encrypt(t, w.keysFor(t, "bare2", 1), x)
	if _, msg := call(t, s2, "he_linear", map[string]any{"ciphertext": envJSON(env2), "weights": W}); !strings.Contains(msg, "no Galois key for rotation") {
		t.Fatalf("--no-galois-on-demand: %q", msg)
	}
	if ext, err := w.adminc.Extension(context.Background(), "bare2", 1); err == nil && len(ext.Document) > 0 {
		t.Fatalf("--no-galois-on-demand asked kmsd for keys: %s", ext.Document)
	}
}

// KeyInfoJSON is he_describe's key entry, as a client reads it.
type KeyInfoJSON struct {
	Name     string `json:"name"`
	Versions []struct {
		Version   uint64 `json:"version"`
		Rotations []int  `json:"rotations"`
	} `json:"versions"`
}

// TestRekeyTool: a ciphertext of version 1 is re-keyed by he_rekey into
// the primary version 2; the result is attested as op rekey and decrypts
// (under version 2) to the same values. Refusals: a target that is not
// later, one that is not enabled.
func TestRekeyTool(t *testing.T) {
	w := newWorld(t)
	w.heKey(t, "rk", "ckks-logn13", 1)
	url := w.startHTTP(t, "--key", "rk", "--refresh", "200ms")
	s := connectHTTP(t, url, w.token(t, "worker", "rk"))
	x := []float64{1.5, -0.25, 3}
	env := w.encrypt(t, w.keysFor(t, "rk", 1), x)
	if _, msg := call(t, s, "he_rekey", map[string]any{"ciphertext": envJSON(env)}); !strings.Contains(msg, "re-keying goes to a later version") {
		t.Fatalf("re-key into its own version: %q", msg)
	}
	if _, err := w.adminc.Rotate(context.Background(), "rk"); err != nil {
		t.Fatal(err)
	}
	// No switching key issued yet: the tool says who issues one.
	deadline := time.Now().Add(10 * time.Second)
	for {
		_, msg := call(t, s, "he_rekey", map[string]any{"ciphertext": envJSON(env)})
		if strings.Contains(msg, "an administrator issues it") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("he_rekey without a switching key: %q", msg)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if _, err := w.adminc.SwitchingKey(context.Background(), "rk", 1, 2); err != nil {
		t.Fatal(err)
	}
	var out map[string]any
	deadline = time.Now().Add(10 * time.Second)
	for {
		var msg string
		out, msg = call(t, s, "he_rekey", map[string]any{"ciphertext": envJSON(env)})
		if msg == "" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("he_rekey 10 s after the rotation: %s", msg)
		}
		time.Sleep(100 * time.Millisecond)
	}
	res := envelopeOf(t, out)
	if res.Version != 2 {
		t.Fatalf("re-keyed into version %d", res.Version)
	}
	st, err := w.keysFor(t, "rk", 2).VerifyAttestation(res)
	if err != nil || st.Op != "rekey" || len(st.Inputs) != 1 || st.KeySwitches != 1 {
		t.Fatalf("attestation: %+v %v", st, err)
	}
	w.decrypt(t, "he_rekey", out, x)
	if _, msg := call(t, s, "he_rekey", map[string]any{"ciphertext": envJSON(env), "to_version": 7}); !strings.Contains(msg, "not enabled") {
		t.Fatalf("re-key into a version that does not exist: %q", msg)
	}
}
