// Package audit is the tamper-evident audit log on top of the store's
// append-only records: RFC 6962 Merkle tree (golang.org/x/mod/sumdb/tlog),
// checkpoints in the C2SP tlog-checkpoint format signed as C2SP signed notes
// with the service's ML-DSA-65 identity key, inclusion and consistency
// proofs, a verifier, and an optional streaming copy for a SIEM.
//
// Signature type. C2SP signed-note assigns no identifier to ML-DSA, so kmsd
// uses the identifier 0xff followed by the ASCII bytes "mldsa65". The key id
// (the 4 bytes before each signature) is the first 4 bytes of
// SHA-256(key name || "\n" || 0xff || "mldsa65" || ML-DSA-65 public key), and
// the signature is ML-DSA-65 (FIPS 204, pure, empty context) over the note
// text exactly as the signed-note format defines it. The key name is
// "kmsd-identity".
package audit

import (
	"crypto/sha256"
	"encoding/binary"
	"fmt"

	"github.com/cloudflare/circl/sign/mldsa/mldsa65"
	"golang.org/x/mod/sumdb/note"
)

// KeyName is the signed-note key name of the identity key.
const KeyName = "kmsd-identity"

// algID is the signature type identifier (see the package comment).
var algID = append([]byte{0xff}, "mldsa65"...)

// KeyHash is the signed-note key id of an ML-DSA-65 public key.
func KeyHash(pub []byte) uint32 {
	h := sha256.New()
	h.Write([]byte(KeyName + "\n"))
	h.Write(algID)
	h.Write(pub)
	return binary.BigEndian.Uint32(h.Sum(nil))
}

// noteSigner signs notes with a signing function (the service's identity
// key, which never leaves the service).
type noteSigner struct {
	hash uint32
	sign func(msg []byte) ([]byte, error)
}

func (s noteSigner) Name() string                    { return KeyName }
func (s noteSigner) KeyHash() uint32                 { return s.hash }
func (s noteSigner) Sign(msg []byte) ([]byte, error) { return s.sign(msg) }

// NewNoteSigner returns a note.Signer for the identity key with public key
// pub, signing with sign.
func NewNoteSigner(pub []byte, sign func(msg []byte) ([]byte, error)) note.Signer {
	return noteSigner{hash: KeyHash(pub), sign: sign}
}

type noteVerifier struct {
	hash uint32
	pk   *mldsa65.PublicKey
}

func (v noteVerifier) Name() string    { return KeyName }
func (v noteVerifier) KeyHash() uint32 { return v.hash }
func (v noteVerifier) Verify(msg, sig []byte) bool {
	return mldsa65.Verify(v.pk, msg, nil, sig)
}

// NewNoteVerifier returns a note.Verifier for an ML-DSA-65 identity public key.
func NewNoteVerifier(pub []byte) (note.Verifier, error) {
	var pk mldsa65.PublicKey
	if err := pk.UnmarshalBinary(pub); err != nil {
		return nil, fmt.Errorf("identity public key: %w", err)
	}
	return noteVerifier{hash: KeyHash(pub), pk: &pk}, nil
}
