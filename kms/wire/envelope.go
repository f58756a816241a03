package wire

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"regexp"
)

// Envelope is how an HE ciphertext crosses a process boundary (MCP tools,
// kmsctl, the SDK, the decrypt endpoint): the key, version and parameters
// it was made under, its level and scale, how many slots hold values, and
// the Lattigo ciphertext (MarshalBinary; standard base64 in JSON). Whoever
// takes one checks every field against the key version it names and the
// ciphertext itself, and refuses a mismatch.
type Envelope struct {
	Key      string  `json:"key"`
	Version  uint64  `json:"version"`
	ParamsID string  `json:"params_id"`
	Level    int     `json:"level"`
	Scale    float64 `json:"scale"`
	Slots    int     `json:"slots"`
	// Ciphertext is the Lattigo ciphertext's MarshalBinary bytes.
	Ciphertext []byte `json:"ciphertext"`
	// Attestation is kmsd's signed statement of where the ciphertext comes
	// from (an attested input, or an evaluation on attested inputs);
	// decryption requires it. It is not part of the envelope's digest.
	Attestation *Attestation `json:"attestation,omitempty"`
}

// envelopeBinary are the envelope's base64 fields, its attestation's
// included.
var envelopeBinary = map[string]bool{"ciphertext": true, "payload": true, "signature": true}

var paramsIDRE = regexp.MustCompile(`^sha256:[0-9a-f]{64}$`)

// ParseEnvelope decodes an envelope strictly (one JSON object, no unknown,
// duplicate, missing or upper-case fields, nothing after it) and checks its
// fields' forms; the
// ciphertext must be at most maxCiphertext bytes. It does not look inside
// the ciphertext: the kind does that against the version's parameters.
func ParseEnvelope(b []byte, maxCiphertext int) (*Envelope, error) {
	if err := CheckJSON(b, JSONRules{Binary: envelopeBinary}); err != nil {
		return nil, Errorf(KindInvalid, "not a ciphertext envelope: %s", err.Error())
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	var raw struct {
		Key        *string  `json:"key"`
		Version    *uint64  `json:"version"`
		ParamsID   *string  `json:"params_id"`
		Level      *int     `json:"level"`
		Scale      *float64 `json:"scale"`
		Slots      *int     `json:"slots"`
		Ciphertext *[]byte  `json:"ciphertext"`
		// Attestation is optional in the form; decryption requires it.
		Attestation *Attestation `json:"attestation"`
	}
	if err := dec.Decode(&raw); err != nil {
		return nil, Errorf(KindInvalid, "not a ciphertext envelope: %s", clipErr(err))
	}
	if _, err := dec.Token(); err != io.EOF {
		return nil, Errorf(KindInvalid, "not a ciphertext envelope: data after the object")
	}
	if raw.Key == nil || raw.Version == nil || raw.ParamsID == nil || raw.Level == nil || raw.Scale == nil || raw.Slots == nil || raw.Ciphertext == nil {
		return nil, Errorf(KindInvalid, "a ciphertext envelope needs key, version, params_id, level, scale, slots and ciphertext")
	}
	e := &Envelope{Key: *raw.Key, Version: *raw.Version, ParamsID: *raw.ParamsID, Level: *raw.Level, Scale: *raw.Scale, Slots: *raw.Slots, Ciphertext: *raw.Ciphertext, Attestation: raw.Attestation}
	if err := e.Check(maxCiphertext); err != nil {
		return nil, err
	}
	return e, nil
}

// Check checks the form of every field; the ciphertext must be at most
// maxCiphertext bytes.
func (e *Envelope) Check(maxCiphertext int) error {
	switch {
	case ValidateName(e.Key) != nil:
		return Errorf(KindInvalid, "envelope: key is not a valid key name")
	case e.Version == 0 || e.Version > math.MaxUint32:
		return Errorf(KindInvalid, "envelope: version must be a positive number")
	case !paramsIDRE.MatchString(e.ParamsID):
		return Errorf(KindInvalid, "envelope: params_id must be sha256:<64 hex digits>")
	case e.Level < 0 || e.Level > 64:
		return Errorf(KindInvalid, "envelope: level %d is out of range", e.Level)
	case !(e.Scale >= 1) || math.IsInf(e.Scale, 0):
		return Errorf(KindInvalid, "envelope: scale must be a finite number of at least 1")
	case e.Slots < 1 || e.Slots > 1<<16:
		return Errorf(KindInvalid, "envelope: slots must be from 1 to 65536")
	case len(e.Ciphertext) == 0:
		return Errorf(KindInvalid, "envelope: the ciphertext is empty")
	case len(e.Ciphertext) > maxCiphertext:
		return Errorf(KindInvalid, "envelope: the ciphertext is %d bytes, more than any ciphertext of these parameters (%d)", len(e.Ciphertext), maxCiphertext)
	}
	return nil
}

// clipErr keeps a decoder error short and free of echoed input.
func clipErr(err error) string {
	s := err.Error()
	if len(s) > 120 {
		s = s[:120]
	}
	return s
}

// MatchVersion refuses an envelope made under another key, version or
// parameter set than the one a request names, saying which.
func (e *Envelope) MatchVersion(name string, version uint64, paramsID string) error {
	if e.Key != name || e.Version != version {
		return Errorf(KindInvalid, "the ciphertext is under key %q version %d, not %q version %d", e.Key, e.Version, name, version)
	}
	if e.ParamsID != paramsID {
		return Errorf(KindInvalid, "the ciphertext was made under parameters %s, but version %d of %q has %s", e.ParamsID, version, name, paramsID)
	}
	return nil
}

// String names the envelope without its ciphertext.
func (e *Envelope) String() string {
	return fmt.Sprintf("%s v%d (%s, level %d, %d slots)", e.Key, e.Version, e.ParamsID, e.Level, e.Slots)
}

// AttestationContext is the ML-DSA context string of attestation
// signatures.
const AttestationContext = "kmsd attestation v1"

// Statement types.
const (
	StatementInput      = "input"
	StatementEvaluation = "evaluation"
)

// Limits of an evaluation's attestation: kmsd refuses a request past
// them, and an evaluator checks its operation against them before it
// computes.
const (
	MaxAttestInputs  = 64      // input attestations one evaluation may name
	MaxAmplification = 1 << 40 // the largest amplification it may declare
	MaxKeySwitches   = 1 << 16 // the most key switches it may declare
)

// Statement is what an attestation says.
type Statement struct {
	Type     string  `json:"type"`
	ID       string  `json:"id"`
	Key      string  `json:"key"`
	Version  uint64  `json:"version"`
	ParamsID string  `json:"params_id"`
	Digest   string  `json:"digest"` // the envelope's digest (Envelope.Digest)
	Level    int     `json:"level"`
	Scale    float64 `json:"scale"`
	Slots    int     `json:"slots"`
	By       string  `json:"by"` // the id of the token that vouched
	Role     Role    `json:"role"`
	Op       string  `json:"op"` // "encrypt", or the evaluation's operation
	// Inputs are the statements an evaluation consumed (evaluation only).
	Inputs []InputRef `json:"inputs,omitempty"`
	// Amplification and KeySwitches are what the evaluator declared of
	// its operation (evaluation only): the largest factor it multiplies an
	// input's noise by, and how many key switches it does.
	Amplification float64 `json:"amplification,omitempty"`
	KeySwitches   int     `json:"key_switches,omitempty"`
	// Sources are the earlier versions of the key the ciphertext was
	// re-keyed from (op "rekey", directly or through its inputs),
	// ascending: its noise depends on their secrets too, so decrypting it
	// spends their decrypt budgets as well, and it is refused once one of
	// them is below the key's min_decryption_version.
	Sources []uint64 `json:"sources,omitempty"`
	// NoiseLog2 is kmsd's bound on log2 of the ciphertext's noise (the
	// largest coefficient of its error polynomial).
	NoiseLog2 float64 `json:"noise_log2"`
	Issued    string  `json:"issued"`
}

// InputRef names an input of an evaluation.
type InputRef struct {
	ID     string `json:"id"`
	Digest string `json:"digest"`
	By     string `json:"by"`
	Type   string `json:"type"`
}

// Attestation is a signed statement: Payload is the statement's JSON,
// Signature its ML-DSA-65 signature (context AttestationContext) with
// version SignedBy of the identity key (GET /v1/identity).
type Attestation struct {
	Payload   []byte `json:"payload"`
	Signature []byte `json:"signature"`
	SignedBy  uint64 `json:"signed_by"`
}

// Digest is the SHA-256 of everything the envelope says but its
// attestation: key, version, parameters, level, scale, slots and the
// ciphertext, each length-prefixed or of fixed size, as "sha256:<hex>".
func (e *Envelope) Digest() string {
	h := sha256.New()
	var b [8]byte
	put := func(s []byte) {
		binary.BigEndian.PutUint64(b[:], uint64(len(s)))
		h.Write(b[:])
		h.Write(s)
	}
	put([]byte("kmsd envelope v1"))
	put([]byte(e.Key))
	binary.BigEndian.PutUint64(b[:], e.Version)
	h.Write(b[:])
	put([]byte(e.ParamsID))
	binary.BigEndian.PutUint64(b[:], uint64(int64(e.Level)))
	h.Write(b[:])
	binary.BigEndian.PutUint64(b[:], math.Float64bits(e.Scale))
	h.Write(b[:])
	binary.BigEndian.PutUint64(b[:], uint64(int64(e.Slots)))
	h.Write(b[:])
	put(e.Ciphertext)
	return "sha256:" + hex.EncodeToString(h.Sum(nil))
}

// Covers refuses an envelope the statement does not vouch for.
func (st *Statement) Covers(e *Envelope) error {
	if st.Key != e.Key || st.Version != e.Version || st.ParamsID != e.ParamsID {
		return Errorf(KindInvalid, "the attestation is for key %q version %d, not this envelope's %q version %d", st.Key, st.Version, e.Key, e.Version)
	}
	if st.Digest != e.Digest() || st.Level != e.Level || st.Scale != e.Scale || st.Slots != e.Slots {
		return Errorf(KindInvalid, "the attestation does not cover this ciphertext (its digest, level, scale or slots differ): kmsd decrypts only the ciphertexts that were attested")
	}
	return nil
}

// ThresholdRequestContext is the ML-DSA context of a requester's signature
// on a threshold decryption request.
const ThresholdRequestContext = "kmsd-threshold-request-v1"

// RequesterSignature is a requester's signature on a threshold decryption
// request, by the key at Index of the key's policy.threshold.requesters:
// every party checks it, so that no node alone (the coordinating one
// included) can have the parties decrypt a ciphertext of its choosing or
// for a key of its own.
type RequesterSignature struct {
	Index     int    `json:"index"`
	Time      int64  `json:"time"` // Unix seconds
	Signature []byte `json:"signature"`
}

// ThresholdRequestMessage is what a requester signs: the key, version,
// the envelope's digest (Envelope.Digest), the SHA-256 of its ephemeral
// public key (the target of the partial decryptions) and the time.
func ThresholdRequestMessage(key string, version uint64, envelopeDigest string, target []byte, at int64) []byte {
	sum := sha256.Sum256(target)
	return []byte(fmt.Sprintf("kmsd threshold decryption request\n%s\n%d\n%s\n%s\n%d", key, version, envelopeDigest, hex.EncodeToString(sum[:]), at))
}
