package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"io"
	"net/http"
	"os"
	"strings"
	"testing"

	"github.com/kmsd-project/kmsd/api/client/hekeys"
)

// TestFullFormCompat (written by an outside review): with --he-key-form full a version's
// manifest has no form, full_digest or full_size field at all (byte-level,
// as an old SDK sees it), the SDK loads it, and ?form=full on a full blob
// serves the blob as it is (its own digest as ETag).
func TestFullFormCompat(t *testing.T) {
	w := newWorldWith(t, true)
	w.heKey(t, "he", "ckks-logn13", 4)
	pub, _ := os.ReadFile(w.identityFile)
	f := &hekeys.Fetcher{BaseURL: w.url, Token: w.admin, IdentityKey: decodeB64(t, string(pub)), CacheDir: t.TempDir(), HTTP: w.adminc.HTTPClient()}
	k, err := f.Fetch(context.Background(), "he", 1)
	if err != nil {
		t.Fatal(err)
	}
	get := func(path string) (*http.Response, []byte) {
		req, _ := http.NewRequest("GET", w.url+path, nil)
		req.Header.Set("Authorization", "Bearer "+w.admin)
		resp, err := w.adminc.HTTPClient().Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp, b
	}
	_, raw := get("/v1/keys/he/versions/1/evaluation-keys")
	for _, field := range []string{`"form"`, `"full_digest"`, `"full_size"`} {
		if bytes.Contains(raw, []byte(field)) {
			t.Fatalf("a full-form manifest has %s: %s", field, raw)
		}
	}
	for _, ref := range k.Manifest.Blobs() {
		h := strings.TrimPrefix(ref.Digest, "sha256:")
		resp, body := get("/v1/blobs/sha256/" + h + "?form=full")
		sum := sha256.Sum256(body)
		if resp.StatusCode != 200 || hex.EncodeToString(sum[:]) != h || resp.Header.Get("ETag") != `"`+ref.Digest+`"` {
			t.Fatalf("?form=full of a full blob: %d, ETag %s", resp.StatusCode, resp.Header.Get("ETag"))
		}
	}
}
