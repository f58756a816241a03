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

// TestBlobChangedWhileServed: a GET hashes the bytes as they stream;
// bytes that differ from the digest (changed in the store after they were
// checked), or a size that differs from the checked one, cut the answer
// off or fail it, which a client sees as an error and no cache keeps;
// bytes that match are served whole, also for ranges the server ignores.
func TestBlobChangedWhileServed(t *testing.T) {
	good := bytes.Repeat([]byte("evaluation key "), 10000)
	sum := sha256.Sum256(good)
	want := hex.EncodeToString(sum[:])
	bad := append([]byte(nil), good...)
	bad[len(bad)-1] ^= 1
	for _, c := range []struct {
		name    string
		body    []byte
		rangeHd string
		whole   bool
	}{
		{"matching", good, "", true},
		{"changed", bad, "", false},
		{"changed, an empty range (ignored by the server)", bad, "bytes=", false},
		{"changed, overlapping ranges (ignored)", bad, "bytes=0-,0-", false},
		{"truncated to nothing", nil, "", false},
		{"grown", append(append([]byte(nil), good...), 'x'), "", false},
	} {
		reported := false
		srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			hr := &hashingReader{r: bytes.NewReader(c.body), want: want, size: int64(len(good))}
			http.ServeContent(w, r, "", time.Time{}, hr)
			if hr.mismatch {
				reported = true
				panic(http.ErrAbortHandler)
			}
		}))
		req, _ := http.NewRequest("GET", srv.URL, nil)
		if c.rangeHd != "" {
			req.Header.Set("Range", c.rangeHd)
		}
		resp, err := http.DefaultClient.Do(req)
		var got []byte
		status := 0
		if err == nil {
			status = resp.StatusCode
			got, err = io.ReadAll(resp.Body)
			resp.Body.Close()
		}
		srv.Close()
		if c.whole && (err != nil || status != 200 || !bytes.Equal(got, good) || reported) {
			t.Errorf("%s: %d, %d bytes, %v, reported %v", c.name, status, len(got), err, reported)
		}
		if !c.whole && err == nil && status < 500 {
			t.Errorf("%s: answered %d with %d bytes", c.name, status, len(got))
		}
	}
}
