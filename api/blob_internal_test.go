package api

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"io"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"
)

// TestBlobChangedWhileServed: a full GET hashes the bytes as they stream;
// bytes that differ from the digest (changed in the store after they were
// checked) cut the answer off, which a client sees as an error and no
// cache keeps, and the digest is reported; bytes that match are served
// whole.
func TestBlobChangedWhileServed(t *testing.T) {
	good := bytes.Repeat([]byte("evaluation key "), 10000)
	sum := sha256.Sum256(good)
	want := hex.EncodeToString(sum[:])
	bad := append([]byte(nil), good...)
	bad[len(bad)-1] ^= 1
	for _, c := range []struct {
		name  string
		body  []byte
		whole bool
	}{{"matching", good, true}, {"changed", bad, false}} {
		reported := false
		srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			content := &hashingReader{r: bytes.NewReader(c.body), want: want, onMismatch: func() { reported = true }}
			http.ServeContent(w, r, "", time.Time{}, content)
		}))
		resp, err := http.Get(srv.URL)
		var got []byte
		if err == nil {
			got, err = io.ReadAll(resp.Body)
			resp.Body.Close()
		}
		srv.Close()
		if c.whole && (err != nil || !bytes.Equal(got, good) || reported) {
			t.Errorf("%s: %d bytes, %v, reported %v", c.name, len(got), err, reported)
		}
		if !c.whole && (err == nil || !reported) {
			t.Errorf("%s: the answer finished (%d bytes, %v), reported %v", c.name, len(got), err, reported)
		}
	}
}
