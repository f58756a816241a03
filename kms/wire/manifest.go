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
	// Threshold is set for a threshold key: the kmsd nodes that hold its
	// secret's shares and how many decrypt together (POST
	// .../threshold-decrypt; plain decryption is refused).
	Threshold *ThresholdRef `json:"threshold,omitempty"`
}

// ThresholdRef names a threshold key's parties.
type ThresholdRef struct {
	Parties []string `json:"parties"`
	T       int      `json:"t"`
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

// ExtensionContext is the ML-DSA context string of manifest extensions:
// distinct from ManifestContext, so that neither passes for the other.
const ExtensionContext = "kms-manifest-extension-v1"

// SwitchingRef names the blob of a switching key from the secret of the
// version whose extension lists it to the secret of version ToVersion of
// the same key (re-keying a ciphertext without decrypting it).
type SwitchingRef struct {
	ToVersion  uint64 `json:"to_version"`
	Digest     string `json:"digest"`
	Size       int64  `json:"size"`
	Form       string `json:"form,omitempty"`
	FullDigest string `json:"full_digest,omitempty"`
	FullSize   int64  `json:"full_size,omitempty"`
}

// Ref is the switching key's BlobRef.
func (s SwitchingRef) Ref() BlobRef {
	return BlobRef{Digest: s.Digest, Size: s.Size, Form: s.Form, FullDigest: s.FullDigest, FullSize: s.FullSize}
}

// ManifestExtension lists the evaluation keys kmsd generated for a version
// after its manifest was signed: Galois keys asked for on demand and
// switching keys to later versions. Each new key makes a new extension
// (Sequence one higher) that lists every key of the one before, signed by
// the identity key with ExtensionContext; the manifest itself never
// changes.
type ManifestExtension struct {
	Key           string         `json:"key"`
	Version       uint64         `json:"version"`
	ParamsID      string         `json:"params_id"`
	Sequence      uint64         `json:"sequence"`
	GaloisKeys    []GaloisRef    `json:"galois_keys"`
	SwitchingKeys []SwitchingRef `json:"switching_keys"`
	CreatedAt     time.Time      `json:"created_at"`
}

// Blobs lists every blob the extension names.
func (e *ManifestExtension) Blobs() []BlobRef {
	var out []BlobRef
	for _, g := range e.GaloisKeys {
		out = append(out, g.Ref())
	}
	for _, s := range e.SwitchingKeys {
		out = append(out, s.Ref())
	}
	return out
}

// SignedExtension is a manifest extension's exact signed bytes with its
// signature, as GET .../evaluation-keys/extension serves them.
type SignedExtension struct {
	Document        []byte `json:"document"` // the ManifestExtension's JSON (base64 on the wire)
	Algorithm       string `json:"algorithm"`
	IdentityVersion uint64 `json:"identity_version"`
	Context         string `json:"context"`
	Signature       []byte `json:"signature"`
}
