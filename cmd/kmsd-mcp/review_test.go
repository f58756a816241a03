package main

import (
	"encoding/json"
	"net/http"
	"strings"
	"testing"
)

// Regression tests for the outside review of kmsd-mcp's resource server.

// postMCP is doMCP's status, headers and body.
func postMCP(t testing.TB, mcpURL, token, body string) (int, http.Header, string) {
	t.Helper()
	resp, b := doMCP(t, mcpURL, token, body)
	return resp.StatusCode, resp.Header, string(b)
}

// TestScopeCheckReadsAsTheSDK: a call on a key beyond the token's
// patterns is 403 insufficient_scope (or 400 for a member named twice)
// in every shape the review found (a second member "Method" or "Params",
// a Kelvin sign for the k of "key", a second member "Ciphertext": the
// check read them case-insensitively, the SDK does not), and never runs.
func TestScopeCheckReadsAsTheSDK(t *testing.T) {
	w := newWorld(t)
	w.heKey(t, "he", "ckks-logn13", 1<<12)
	w.heKey(t, "he2", "ckks-logn13", 1<<12)
	mcpURL := w.startHTTP(t, "--key", "he", "--key", "he2", "--stateless")
	tok := w.token(t, "worker", "he")
	he2, _ := json.Marshal(envJSON(w.encrypt(t, w.keysFor(t, "he2", 1), []float64{1, 2, 3})))
	he, _ := json.Marshal(envJSON(w.encrypt(t, w.keysFor(t, "he", 1), []float64{1, 2, 3})))
	call := func(args string) string {
		return `"params":{"name":"he_polynomial","arguments":{` + args + `,"coefficients":[0,1]}}`
	}
	for name, body := range map[string]string{
		"plain":                      `{"jsonrpc":"2.0","id":1,"method":"tools/call",` + call(`"ciphertext":`+string(he2)) + `}`,
		"a second member Method":     `{"jsonrpc":"2.0","id":2,"method":"tools/call",` + call(`"ciphertext":`+string(he2)) + `,"Method":"ping"}`,
		"a second member Params":     `{"jsonrpc":"2.0","id":3,"method":"tools/call",` + call(`"ciphertext":`+string(he2)) + `,"Params":{"arguments":{"ciphertext":{"key":"he"}}}}`,
		"a Kelvin sign key":          `{"jsonrpc":"2.0","id":4,"method":"tools/call",` + call(`"ciphertext":`+strings.Replace(string(he2), `"key":"he2"`, `"key":"he2","`+"\u212a"+`ey":"he"`, 1)) + `}`,
		"a second member Ciphertext": `{"jsonrpc":"2.0","id":5,"method":"tools/call",` + call(`"ciphertext":`+string(he2)+`,"Ciphertext":`+string(he)) + `}`,
		"key twice":                  `{"jsonrpc":"2.0","id":6,"method":"tools/call",` + call(`"ciphertext":`+strings.Replace(string(he2), `"key":"he2"`, `"key":"he2","key":"he"`, 1)) + `}`,
	} {
		st, h, b := postMCP(t, mcpURL, tok, body)
		switch {
		case st == 403 && strings.Contains(h.Get("WWW-Authenticate"), `scope="worker key:he2"`):
		case st == 400 && strings.Contains(name, "twice"):
		default:
			t.Errorf("%s: %d %q %.200s", name, st, h.Get("WWW-Authenticate"), b)
		}
	}
}

// TestKeyNamesBeyondScope: a token learns only the served keys within its
// patterns: resources/list lists only their manifests, and a call on a
// key it may use but the server does not serve names no other key.
func TestKeyNamesBeyondScope(t *testing.T) {
	w := newWorld(t)
	w.heKey(t, "he", "ckks-logn13", 1<<12)
	w.heKey(t, "zz-secret", "ckks-logn13", 1<<12)
	mcpURL := w.startHTTP(t, "--key", "he", "--key", "zz-secret", "--stateless")
	tok := w.token(t, "worker", "he*")
	_, _, b := postMCP(t, mcpURL, tok, `{"jsonrpc":"2.0","id":1,"method":"resources/list","params":{}}`)
	if strings.Contains(b, "zz-secret") || !strings.Contains(b, "kmsd://keys/he/manifest") {
		t.Errorf("resources/list for a token of he*: %.400s", b)
	}
	env := envJSON(w.encrypt(t, w.keysFor(t, "he", 1), []float64{1, 2, 3}))
	env["key"] = "he-other"
	args, _ := json.Marshal(map[string]any{"ciphertext": env, "coefficients": []float64{0, 1}})
	_, _, b = postMCP(t, mcpURL, tok, `{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"he_polynomial","arguments":`+string(args)+`}}`)
	if strings.Contains(b, "zz-secret") || !strings.Contains(b, "does not serve key") {
		t.Errorf("a call on an unserved key: %.400s", b)
	}
	// A token for every key sees both.
	_, _, b = postMCP(t, mcpURL, w.token(t, "worker", "*"), `{"jsonrpc":"2.0","id":3,"method":"resources/list","params":{}}`)
	if !strings.Contains(b, "zz-secret") {
		t.Errorf("resources/list for a token of every key: %.400s", b)
	}
}
