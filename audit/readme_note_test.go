package audit_test

import (
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"strings"
	"testing"

	"github.com/cloudflare/circl/sign/mldsa/mldsa65"
	"golang.org/x/mod/sumdb/note"
)

// TestCheckpointNoteAsREADMESays: a checkpoint's signature line is what
// README's audit archive section says, computed here from the text alone:
// the key ID is SHA-256("kmsd-identity\n" || 0xff || "mldsa65" || public
// key)[:4], the signature ML-DSA-65 (pure, empty context) over the note's
// text; a signed-note verifier that does not know the key parses the note
// and reports the signature as unverified, not the note as malformed.
func TestCheckpointNoteAsREADMESays(t *testing.T) {
	f := newFixture(t, 10, 10)
	msg := f.checkpoints[len(f.checkpoints)-1]
	text, sigs, ok := strings.Cut(string(msg), "\n\n")
	if !ok || len(strings.Split(text, "\n")) != 3 {
		t.Fatalf("not a three-line note: %q", msg)
	}
	line, ok := strings.CutPrefix(strings.TrimSuffix(sigs, "\n"), "— kmsd-identity ")
	if !ok || strings.Contains(line, "\n") {
		t.Fatalf("signature line %q", sigs)
	}
	raw, err := base64.StdEncoding.DecodeString(line)
	if err != nil || len(raw) != 4+mldsa65.SignatureSize {
		t.Fatalf("signature: %d bytes, %v", len(raw), err)
	}
	h := sha256.Sum256(append([]byte("kmsd-identity\n\xffmldsa65"), f.pub...))
	if binary.BigEndian.Uint32(raw[:4]) != binary.BigEndian.Uint32(h[:4]) {
		t.Fatal("the key ID is not README's")
	}
	var pk mldsa65.PublicKey
	if err := pk.UnmarshalBinary(f.pub); err != nil {
		t.Fatal(err)
	}
	if !mldsa65.Verify(&pk, []byte(text+"\n"), nil, raw[4:]) {
		t.Fatal("the signature is not ML-DSA-65 over the note's text")
	}
	_, err = note.Open(msg, note.VerifierList())
	var unv *note.UnverifiedNoteError
	if !errors.As(err, &unv) || len(unv.Note.UnverifiedSigs) != 1 || unv.Note.Text != text+"\n" {
		t.Fatalf("a verifier without the key: %v", err)
	}
}
