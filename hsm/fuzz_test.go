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
	f.Fuzz(func(t *testing.T, b []byte) {
		p, err := parseBlob(b)
		if err != nil {
			return
		}
		var out []byte
		out = append(out, blobMagic...)
		out = append(out, byte(len(p.kekID)>>8), byte(len(p.kekID)))
		out = append(out, p.kekID...)
		out = append(out, p.wrapIV...)
		out = append(out, byte(len(p.wrapped)>>8), byte(len(p.wrapped)))
		out = append(out, p.wrapped...)
		out = append(out, p.nonce...)
		out = append(out, p.ct...)
		if !bytes.Equal(out, b) {
			t.Fatal("parse and re-encode differ")
		}
	})
}
