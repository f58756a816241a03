package wire

import (
	"encoding/json"
	"time"
)

// BlobRef names a blob.
type BlobRef struct {
	Digest string `json:"digest"` // "sha256:<hex>"
	Size   int64  `json:"size"`
	// Form is FormSeeded for a key stored as its b halves and the seed
	// of its a halves (package he/seedkey); "": the key's full Lattigo
	// encoding. FullDigest and FullSize are then the expanded key's: what
	// the expansion must give, and what ?form=full serves.
	Form       string `json:"form,omitempty"`
	FullDigest string `json:"full_digest,omitempty"`
	FullSize   int64  `json:"full_size,omitempty"`
}

// FormSeeded is the Form of a seeded key's blob.
const FormSeeded = "seeded"

// GaloisRef names the blob of one Galois key.
type GaloisRef struct {
	GaloisElement uint64 `json:"galois_element"`
	Digest        string `json:"digest"`
	Size          int64  `json:"size"`
	Form          string `json:"form,omitempty"`
	FullDigest    string `json:"full_digest,omitempty"`
	FullSize      int64  `json:"full_size,omitempty"`
}

// Ref is the Galois key's BlobRef.
func (g GaloisRef) Ref() BlobRef {
	return BlobRef{Digest: g.Digest, Size: g.Size, Form: g.Form, FullDigest: g.FullDigest, FullSize: g.FullSize}
}

// ManifestContext is the ML-DSA context string of manifest signatures.
const ManifestContext = "kms-manifest-v1"

// Manifest lists a HE version's blobs. It is encoded once (fields in this
// order), signed by the identity key over the exact bytes, and served
// byte-identical forever.
type Manifest struct {
	Key                string          `json:"key"`
	Version            uint64          `json:"version"`
	Kind               string          `json:"kind"`
	ParamsID           string          `json:"params_id"`
	Params             json.RawMessage `json:"params"`
	PublicKey          BlobRef         `json:"public_key"`
	RelinearizationKey *BlobRef        `json:"relinearization_key"`
	GaloisKeys         []GaloisRef     `json:"galois_keys"`
	CreatedAt          time.Time       `json:"created_at"`
}

// Literal is the Lattigo parameters literal the manifest names, as the
// JSON text params_id hashes. Manifests carry it as a JSON string, so that
// 64-bit moduli reach every JSON parser exact (a JavaScript client rounds
// numbers above 2^53); manifests made before that carry it as an object.
func (m *Manifest) Literal() ([]byte, error) {
	if len(m.Params) > 0 && m.Params[0] == '"' {
		var s string
		if err := json.Unmarshal(m.Params, &s); err != nil {
			return nil, err
		}
		return []byte(s), nil
	}
	return m.Params, nil
}

// Blobs lists every blob the manifest names: the public key, the
// relinearization key if any, then the Galois keys.
func (m *Manifest) Blobs() []BlobRef {
	out := []BlobRef{m.PublicKey}
	if m.RelinearizationKey != nil {
		out = append(out, *m.RelinearizationKey)
	}
	for _, g := range m.GaloisKeys {
		out = append(out, g.Ref())
	}
	return out
}
