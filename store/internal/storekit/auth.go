package storekit

import (
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/binary"
	"errors"
	"fmt"
	"math/bits"
	"sync"
	"sync/atomic"
	"time"

	"github.com/kmsd-project/kmsd/kms"
)

// Record authentication: every record a store keeps (a key header, a
// version, a token, an index entry, a pending audit group, an audit row,
// the log's end and head, kmsd's metadata) is stored as
//
//	body || seq (8 bytes, big-endian) || tag (32 bytes)
//	tag = HMAC-SHA256(K_mac, "kmsd-record-v1" || len(path) || path || seq || body)
//
// where path is the record's place in the store (relative to an etcd
// prefix, or bucket/key in bbolt) and seq counts the writes of that path
// (1 for the first). A record edited, invented or moved to another path
// fails its tag, and the store refuses it (kms.TamperError).
//
// A record put back (an earlier authentic value of the same path) or
// deleted passes its tag; the store digest catches it. The digest is the
// sum modulo 2^256 of HMAC-SHA256(K_state, tag) over every record of the
// digested set (everything but the audit rows and checkpoints, which the
// audit log's own tree and signed checkpoints cover, and the digest
// records themselves). Each transaction adds its new records' terms and
// subtracts those it overwrites or deletes, in the same transaction, in an
// authenticated digest record; a scrub sums the terms of what is stored
// and compares. K_state never leaves the process, so a record's term
// cannot be computed from what the store holds, and no set of earlier
// records can be chosen to sum to the same digest.
//
// K_mac and K_state derive from one 32-byte record key, generated at the
// store's first start and kept in the store sealed under the HSM's KEK
// (RecordKeyContext): whoever can write the store cannot read it.

// RecordKeyMeta is the metadata name under which a store keeps its sealed
// record key.
const RecordKeyMeta = "record-key"

// RecordKeyContext is what the record key is sealed to.
var RecordKeyContext = kms.SealContext{Key: "_records", Version: 1, Kind: "hmac-sha256"}

const (
	seqLen  = 8
	tagLen  = sha256.Size
	overLen = seqLen + tagLen
	label   = "kmsd-record-v1"
)

// Auth authenticates a store's records under its record key.
type Auth struct {
	mac, state []byte
	// broken, once set, is the scrub's finding: the stored records do not
	// sum to the digest, so any of them may be an earlier value, and Open
	// refuses every record until kmsd restarts on a store that passes.
	broken atomic.Pointer[kms.TamperError]
	// Tampered counts the records refused since start.
	Tampered atomic.Uint64
}

func derive(root []byte, what string) []byte {
	m := hmac.New(sha256.New, root)
	m.Write([]byte("kmsd-record-key-v1/" + what))
	return m.Sum(nil)
}

// NewAuth derives the record keys from root (32 bytes).
func NewAuth(root []byte) (*Auth, error) {
	if len(root) != 32 {
		return nil, fmt.Errorf("record key: %d bytes, want 32", len(root))
	}
	return &Auth{mac: derive(root, "mac"), state: derive(root, "state")}, nil
}

// NewRecordKey makes a record key and returns it with its sealed form.
func NewRecordKey(ctx context.Context, s kms.Sealer) (*Auth, []byte, error) {
	root := make([]byte, 32)
	if _, err := rand.Read(root); err != nil {
		return nil, nil, err
	}
	a, err := NewAuth(root)
	if err != nil {
		return nil, nil, err
	}
	defer clear(root) // a holds the derived keys; the root lives on only sealed
	sealed, err := s.Seal(ctx, RecordKeyContext, kms.NewSecret(root))
	if err != nil {
		return nil, nil, fmt.Errorf("seal the store's record key in the HSM: %w", err)
	}
	return a, sealed, nil
}

// OpenRecordKey unseals a stored record key.
func OpenRecordKey(ctx context.Context, s kms.Sealer, sealed []byte) (*Auth, error) {
	root, err := s.Unseal(ctx, RecordKeyContext, sealed)
	if err != nil {
		return nil, fmt.Errorf("unseal the store's record key (is this the HSM and KEK the store was made with?): %w", err)
	}
	defer root.Wipe()
	return NewAuth(root.Reveal())
}

func (a *Auth) tag(path string, seq uint64, body []byte) []byte {
	m := hmac.New(sha256.New, a.mac)
	m.Write([]byte(label))
	var n [12]byte
	binary.BigEndian.PutUint32(n[:4], uint32(len(path)))
	m.Write(n[:4])
	m.Write([]byte(path))
	binary.BigEndian.PutUint64(n[4:], seq)
	m.Write(n[4:])
	m.Write(body)
	return m.Sum(nil)
}

// Seal returns the stored form of body at path, written for the seq-th
// time.
func (a *Auth) Seal(path string, seq uint64, body []byte) []byte {
	out := make([]byte, 0, len(body)+overLen)
	out = append(out, body...)
	out = binary.BigEndian.AppendUint64(out, seq)
	return append(out, a.tag(path, seq, body)...)
}

// Tamper is the error of a record that fails its check.
func (a *Auth) Tamper(path, reason string) error {
	a.Tampered.Add(1)
	return &kms.Error{Kind: kms.KindInternal, Op: "store", Msg: kms.TamperMessage, Err: &kms.TamperError{Path: path, Reason: reason}}
}

// Open checks the stored form of the record at path and returns its body
// and seq. A record that fails is a *kms.TamperError (in a
// kms.KindInternal error); so is every record once Break was called.
func (a *Auth) Open(path string, stored []byte) ([]byte, uint64, error) {
	if t := a.broken.Load(); t != nil {
		return nil, 0, &kms.Error{Kind: kms.KindInternal, Op: "store", Msg: kms.TamperMessage, Err: t}
	}
	return a.open(path, stored)
}

func (a *Auth) open(path string, stored []byte) ([]byte, uint64, error) {
	if len(stored) < overLen {
		return nil, 0, a.Tamper(path, "too short to carry a tag")
	}
	body := stored[:len(stored)-overLen]
	seq := binary.BigEndian.Uint64(stored[len(body):])
	if subtle.ConstantTimeCompare(a.tag(path, seq, body), stored[len(stored)-tagLen:]) != 1 {
		return nil, 0, a.Tamper(path, "its tag does not match (edited, invented or moved)")
	}
	return body, seq, nil
}

// Break makes every later Open fail with t: the scrub found the store
// does not sum to its digest.
func (a *Auth) Break(t *kms.TamperError) { a.broken.CompareAndSwap(nil, t) }

// Check is nil while the store is whole, and the scrub's finding (a
// kms.TamperError in a kms.KindInternal error) once Break was called.
func (a *Auth) Check() error {
	if t := a.broken.Load(); t != nil {
		return &kms.Error{Kind: kms.KindInternal, Op: "store", Msg: kms.TamperMessage, Err: t}
	}
	return nil
}

// Broken returns what Break was given, nil if the store is whole.
func (a *Auth) Broken() *kms.TamperError { return a.broken.Load() }

// Digest is a sum modulo 2^256 of record terms.
type Digest [4]uint64

// DigestLen is the length of a digest's encoding.
const DigestLen = 32

func (d *Digest) add(t [32]byte) {
	var c uint64
	for i := 3; i >= 0; i-- {
		d[i], c = bits.Add64(d[i], binary.BigEndian.Uint64(t[i*8:]), c)
	}
}

func (d *Digest) sub(t [32]byte) {
	var b uint64
	for i := 3; i >= 0; i-- {
		d[i], b = bits.Sub64(d[i], binary.BigEndian.Uint64(t[i*8:]), b)
	}
}

// Plus adds o to d.
func (d *Digest) Plus(o Digest) { d.add(o.bytes()) }

// Minus subtracts o from d.
func (d *Digest) Minus(o Digest) { d.sub(o.bytes()) }

func (d Digest) bytes() [32]byte {
	var b [32]byte
	for i := range 4 {
		binary.BigEndian.PutUint64(b[i*8:], d[i])
	}
	return b
}

// Bytes encodes d.
func (d Digest) Bytes() []byte { b := d.bytes(); return b[:] }

// ParseDigest decodes a digest.
func ParseDigest(b []byte) (Digest, error) {
	var d Digest
	if len(b) != DigestLen {
		return d, errors.New("a digest is 32 bytes")
	}
	for i := range 4 {
		d[i] = binary.BigEndian.Uint64(b[i*8:])
	}
	return d, nil
}

// Term is a stored record's term of the digest (its tag must have been
// checked, or be about to be).
func (a *Auth) Term(stored []byte) Digest {
	m := hmac.New(sha256.New, a.state)
	m.Write(stored[max(len(stored)-tagLen, 0):])
	var t [32]byte
	copy(t[:], m.Sum(nil))
	var d Digest
	d.add(t)
	return d
}

// Put returns the stored form of body at path, which holds old (nil if
// nothing), and moves the transaction's delta: old's term out, the new
// record's in. old must pass its check: a write never builds on a record
// that does not.
func (a *Auth) Put(delta *Digest, path string, old, body []byte) ([]byte, error) {
	seq := uint64(1)
	if old != nil {
		_, n, err := a.Open(path, old)
		if err != nil {
			return nil, err
		}
		seq = n + 1
		delta.Minus(a.Term(old))
	}
	stored := a.Seal(path, seq, body)
	delta.Plus(a.Term(stored))
	return stored, nil
}

// Delete moves the delta for deleting old, stored at path.
func (a *Auth) Delete(delta *Digest, path string, old []byte) error {
	if _, _, err := a.Open(path, old); err != nil {
		return err
	}
	delta.Minus(a.Term(old))
	return nil
}

// AsTamper returns the tamper error in err's chain, nil if none.
func AsTamper(err error) *kms.TamperError {
	var t *kms.TamperError
	if errors.As(err, &t) {
		return t
	}
	return nil
}

// Raise sets v to n if n is larger.
func Raise(v *atomic.Uint64, n uint64) {
	for {
		o := v.Load()
		if n <= o || v.CompareAndSwap(o, n) {
			return
		}
	}
}

// ScrubReport is what one scrub checked.
type ScrubReport struct {
	Records int           // digested records checked
	Seq     uint64        // the store's write count (bbolt) or the digest records' total (etcd)
	Took    time.Duration // how long it took
}

// Integrity is what a store's scrubs and reads have found.
type Integrity struct {
	// Broken is the scrub's finding that made the store refuse every
	// record, nil if none.
	Broken *kms.TamperError `json:"broken,omitempty"`
	// Tampered counts records refused since start.
	Tampered uint64 `json:"tampered_records"`
	// LastScrub is when the last scrub ended (zero before the first).
	LastScrub time.Time `json:"last_scrub,omitzero"`
	// LastRecords is how many records it checked; LastError what it
	// found wrong, "" if nothing.
	LastRecords int    `json:"last_scrub_records"`
	LastError   string `json:"last_scrub_error,omitempty"`
}

// Scrubs keeps the outcome of a store's last scrub.
type Scrubs struct {
	mu   sync.Mutex
	last Integrity
}

// Note keeps a scrub's outcome.
func (s *Scrubs) Note(rep ScrubReport, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.last.LastScrub = time.Now().UTC()
	s.last.LastRecords = rep.Records
	s.last.LastError = ""
	if err != nil {
		s.last.LastError = err.Error()
	}
}

// Report is the store's integrity as a seen by a.
func (s *Scrubs) Report(a *Auth) Integrity {
	s.mu.Lock()
	in := s.last
	s.mu.Unlock()
	in.Broken = a.Broken()
	in.Tampered = a.Tampered.Load()
	return in
}

// Unverified returns the body of a stored record without checking its
// tag: only for what kmsd reads before it can open the record key (which
// HSM key to open), and checks again once it can.
func Unverified(stored []byte) []byte {
	if len(stored) < overLen {
		return nil
	}
	return stored[:len(stored)-overLen]
}

// sameRoot reports whether a and b derive from one record key.
func (a *Auth) sameRoot(b *Auth) bool {
	return subtle.ConstantTimeCompare(a.mac, b.mac) == 1 && subtle.ConstantTimeCompare(a.state, b.state) == 1
}

// ResealRecordKey seals a store's record key again under the sealer's
// primary KEK (a KEK rotation): it returns the new sealed form, or nil if
// sealed is under the primary already. The key must be a's.
func (a *Auth) ResealRecordKey(ctx context.Context, s kms.Sealer, sealed []byte) ([]byte, error) {
	ring, ok := s.(kms.KEKRing)
	if !ok {
		return nil, kms.ErrNoRing
	}
	if id, err := ring.BlobKEK(sealed); err == nil && id == ring.KEKID() {
		return nil, nil
	}
	root, err := s.Unseal(ctx, RecordKeyContext, sealed)
	if err != nil {
		return nil, fmt.Errorf("unseal the store's record key: %w", err)
	}
	defer root.Wipe()
	b, err := NewAuth(root.Reveal())
	if err != nil {
		return nil, err
	}
	if !a.sameRoot(b) {
		return nil, errors.New("the store's sealed record key is not the one it was opened with")
	}
	out, err := s.Seal(ctx, RecordKeyContext, root)
	if err != nil {
		return nil, fmt.Errorf("seal the store's record key again: %w", err)
	}
	return out, nil
}

// SameRecordKey reports whether sealed (a record key that is not the
// bytes loaded at start) is the same key sealed again (by a KEK rotation,
// here or on another replica).
func (a *Auth) SameRecordKey(ctx context.Context, s kms.Sealer, sealed []byte) bool {
	root, err := s.Unseal(ctx, RecordKeyContext, sealed)
	if err != nil {
		return false
	}
	defer root.Wipe()
	b, err := NewAuth(root.Reveal())
	return err == nil && a.sameRoot(b)
}

// RecordKeyKEK is the KEK a sealed record key is under.
func RecordKeyKEK(s kms.Sealer, sealed []byte) (string, error) {
	ring, ok := s.(kms.KEKRing)
	if !ok {
		return "", kms.ErrNoRing
	}
	return ring.BlobKEK(sealed)
}
