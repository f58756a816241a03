package api_test

import (
	"strings"
	"testing"
)

// TestThresholdWithoutPeers: a node without --peers refuses threshold
// keys and answers no peer message; a plain key refuses threshold
// decryption. Nothing is made.
func TestThresholdWithoutPeers(t *testing.T) {
	e := newEnv(t)
	st, _, b := e.raw("POST", "/v1/keys", e.admin, "application/json", `{"name":"tk","kind":"ckks","policy":{"params":"ckks-logn13","threshold":{"parties":["a","b"],"t":2}}}`)
	if st != 409 || !strings.Contains(string(b), "has no peers") {
		t.Fatalf("threshold key without peers: %d %s", st, b)
	}
	if st, _, _ := e.raw("GET", "/v1/keys/tk", e.admin, "", ""); st != 404 {
		t.Fatalf("the refused key: %d", st)
	}
	st, _, b = e.raw("POST", "/v1/keys", e.admin, "application/json", `{"name":"tk","kind":"ml-dsa-65","policy":{"threshold":{"parties":["a","b"],"t":2}}}`)
	if st != 400 {
		t.Fatalf("threshold on a non-HE kind: %d %s", st, b)
	}
	heKey(t, e, "plain", `{"name":"plain","kind":"ckks","policy":{"params":"ckks-logn13"}}`)
	st, _, b = e.raw("POST", "/v1/keys/plain/versions/1/threshold-decrypt", e.admin, "application/json", `{"ciphertext":{},"public_key":"AAAA"}`)
	if st != 400 && st != 409 {
		t.Fatalf("threshold decryption of a plain key: %d %s", st, b)
	}
	if st, _, b := e.raw("POST", "/v1/peer/ping", "", "application/octet-stream", "x"); st != 404 {
		t.Fatalf("a peer message to a node without peers: %d %s", st, b)
	}
}
