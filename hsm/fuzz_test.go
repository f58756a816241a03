package hsm

import (
	"bytes"
	"testing"
)

// FuzzParseBlob: no input makes the blob parser panic, and what it accepts
// re-encodes to the same bytes.
func FuzzParseBlob(f *testing.F) {
	f.Add([]byte("KMS1"))
	f.Add(append([]byte("KMS1\x00\x02id"), make([]byte, 12+2+48+12+40)...))
	f.Add(append([]byte("KMS2\x03\x00\x02id\x00\x10"), make([]byte, 16+2+48+2+32+12+40)...))
	f.Fuzz(func(t *testing.T, b []byte) {
		p, err := parseBlob(b)
		if err != nil {
			return
		}
		out := append(p.header(), p.ct...)
		if !bytes.Equal(out, b) {
			t.Fatal("parse and re-encode differ")
		}
	})
}
