package hsm

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/miekg/pkcs11"
)

// The KEK ring: a sealer seals under one KEK (the primary) and opens
// blobs sealed under any KEK of its ring, each found in the token by the
// label and its own CKA_ID (a blob names the KEK that sealed it). A KEK
// rotation makes a new KEK (NewKEK), makes it primary (SetRing), has
// every blob sealed again under it, and then destroys the old one
// (DestroyKEK). KEKs of one ring share the label: the id tells them
// apart, and so do their side keys (cbc-hmac's MAC key, kwp's wrap key),
// which bear their KEK's id.

// kekSet is one KEK of the ring and its side keys.
type kekSet struct {
	kek, mac, kwp pkcs11.ObjectHandle
}

// ErrKEKInUse: a KEK that still seals (the primary) cannot be destroyed.
var ErrKEKInUse = errors.New("the KEK is the ring's primary: it seals new material")

// findSet finds the KEK with the id and its side keys (makes them, with
// make: the KEK with that id and the side key the sealer's profile needs).
// The KEK's attributes are checked as at start.
func (s *Sealer) findSet(c *conn, id string, create bool) (kekSet, error) {
	var ks kekSet
	raw, err := hex.DecodeString(id)
	if err != nil || len(raw) == 0 || hex.EncodeToString(raw) != id {
		return ks, fmt.Errorf("%w: KEK id %q is not lower-case hex", ErrKEK, id)
	}
	label := s.cfg.KEKLabel
	objs, err := findByLabel(s.mod, c.loginSess, label, raw)
	if err != nil {
		return ks, err
	}
	switch len(objs) {
	case 0:
		if !create {
			return ks, fmt.Errorf("%w: no key labelled %q with id %s in the token", ErrKEKMissing, label, id)
		}
		if !c.have[pkcs11.CKM_AES_KEY_GEN] {
			return ks, fmt.Errorf("%w: CKM_AES_KEY_GEN (to make the KEK)", ErrMechanism)
		}
		ks.kek, err = s.mod.GenerateKey(c.loginSess, []*pkcs11.Mechanism{pkcs11.NewMechanism(kekKey.gen, nil)}, kekKey.template(label, raw))
		if err != nil {
			return ks, fmt.Errorf("generate KEK %q (id %s): %w", label, id, err)
		}
	case 1:
		ks.kek = objs[0]
	default:
		return ks, fmt.Errorf("%w: more than one key is labelled %q with id %s", ErrKEK, label, id)
	}
	a, err := KEKAttributes(s.mod, c.loginSess, ks.kek)
	if err != nil {
		return ks, err
	}
	if err := a.check(); err != nil {
		return ks, fmt.Errorf("%w: %q (id %s) %v", ErrKEK, label, id, err)
	}
	makeMAC := create && s.profile == ProfileCBCHMAC
	if ks.mac, err = findOrCreateSideKey(s.mod, c.loginSess, macKey, label+"-mac", id, makeMAC); err != nil {
		return ks, err
	}
	makeKWP := create && s.profile == ProfileKWP
	if ks.kwp, err = findOrCreateSideKey(s.mod, c.loginSess, kwpKey, label+"-kwp", id, makeKWP); err != nil {
		return ks, err
	}
	return ks, nil
}

// connected returns the current connection, or why there is none. Called
// with mu held.
func (s *Sealer) connected() (*conn, error) {
	if s.closed {
		return nil, ErrClosed
	}
	s.hmu.Lock()
	healthy, last := s.healthy, s.lastErr
	s.hmu.Unlock()
	if !healthy || s.c == nil {
		return nil, fmt.Errorf("%w: %v", ErrDisconnected, last)
	}
	return s.c, nil
}

// knows makes sure the ring holds the KEK with the id: one another
// process of the same store made primary since this one read the ring
// (replicas) is found in the token, never made. A KEK the token does not
// hold is ErrBlob.
func (s *Sealer) knows(id string) error {
	// Every unseal comes here: a map lookup under the read lock for a
	// KEK the ring holds; the token is searched only for another.
	s.mu.RLock()
	c, err := s.connected()
	known := err == nil && (id == c.kekID || c.others[id] != (kekSet{}) || c.seen[id] != (kekSet{}))
	s.mu.RUnlock()
	if err != nil || known {
		return err
	}
	if raw, err := hex.DecodeString(id); err != nil || len(raw) == 0 || hex.EncodeToString(raw) != id {
		return fmt.Errorf("%w: it names KEK %q, not a lower-case hex id", ErrBlob, id)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if c, err = s.connected(); err != nil {
		return err
	}
	if id == c.kekID || c.others[id] != (kekSet{}) || c.seen[id] != (kekSet{}) {
		return nil
	}
	ks, err := s.findSet(c, id, false)
	if errors.Is(err, ErrKEKMissing) || errors.Is(err, ErrKEK) {
		return fmt.Errorf("%w: sealed under KEK %s, which the token does not hold (retired, or another token's)", ErrBlob, id)
	}
	if err != nil {
		return err
	}
	// It opens, and that is all: only the store's ring (SetRing) is
	// reported, and only a KEK of it is destroyed.
	c.seen[id] = ks
	s.log.Info("HSM: found a KEK a blob names in the token", "kek_id", id)
	return nil
}

// NewKEK makes the KEK with the id in the token (or finds it, made by a
// NewKEK a crash interrupted), with the side key the sealer's profile
// needs, checks its attributes as at start and that it round-trips, and
// adds it to the ring. It does not seal until SetRing makes it primary.
func (s *Sealer) NewKEK(ctx context.Context, id string) (err error) {
	defer s.observe("generate_kek", time.Now(), &err)
	s.mu.Lock()
	c, err := s.connected()
	if err != nil {
		s.mu.Unlock()
		return err
	}
	ks, err := s.findSet(c, id, true)
	if err != nil {
		s.mu.Unlock()
		return err
	}
	if s.profile == ProfileCBCHMAC && ks.mac == 0 || s.profile == ProfileKWP && ks.kwp == 0 {
		s.mu.Unlock()
		return fmt.Errorf("%w: the new KEK has no side key for the %s profile", ErrMechanism, s.profile)
	}
	if id != c.kekID {
		c.others[id] = ks
		if !slices.Contains(s.others, id) {
			s.others = append(s.others, id)
		}
	}
	s.mu.Unlock()
	return s.runWith(ctx, id, func(sh pkcs11.SessionHandle, k keys) error { return s.pingKEK(sh, k, s.profile) })
}

// SetRing makes primary the KEK that seals and others the ones that only
// open. The primary must be in the token (found, never made); another
// that is not (retired meanwhile by another process of the store) is left
// out with a warning. A KEK left out is dropped from the ring (not
// destroyed).
func (s *Sealer) SetRing(primary string, others []string) error {
	for try := 0; ; try++ {
		err := s.setRing(primary, others)
		if !errors.Is(err, errReconnected) || try == 3 {
			return err
		}
	}
}

// errReconnected: the connection changed under a SetRing; it starts over.
var errReconnected = errors.New("the HSM connection changed during the ring switch")

func (s *Sealer) setRing(primary string, others []string) error {
	// 1. Every KEK of the new ring found, under the lock.
	s.mu.Lock()
	c, err := s.connected()
	if errors.Is(err, ErrDisconnected) && !s.closed {
		// Recorded for the reconnection: it finds this primary (and
		// wraps its ping block), whatever the ring was when the link
		// went down.
		s.kekID, s.cfg.KEKID = primary, primary
		s.others = slices.DeleteFunc(slices.Clone(others), func(o string) bool { return o == primary })
		s.mu.Unlock()
		return err
	}
	if err != nil {
		s.mu.Unlock()
		return err
	}
	sets := map[string]kekSet{c.kekID: {kek: c.kek, mac: c.mac, kwp: c.kwp}}
	for id, ks := range c.seen {
		sets[id] = ks
	}
	for id, ks := range c.others {
		sets[id] = ks
	}
	for _, id := range append([]string{primary}, others...) {
		if _, ok := sets[id]; ok {
			continue
		}
		ks, err := s.findSet(c, id, false)
		if errors.Is(err, ErrKEKMissing) && id != primary {
			s.log.Warn("HSM: a KEK of the store's ring is not in the token; left out", "kek_id", id)
			continue
		}
		if err != nil {
			s.mu.Unlock()
			return err
		}
		sets[id] = ks
		if id != c.kekID {
			c.seen[id] = ks // opens at once; the ring is set below
		}
	}
	p := sets[primary]
	if s.profile == ProfileCBCHMAC && p.mac == 0 || s.profile == ProfileKWP && p.kwp == 0 {
		s.mu.Unlock()
		return fmt.Errorf("%w: KEK %s has no side key for the %s profile", ErrMechanism, primary, s.profile)
	}
	changed := primary != c.kekID
	s.mu.Unlock()
	// 2. A ping block under the new primary, before it is primary: Ping
	// never meets a block of another KEK.
	var plain []byte
	var w wrapped
	if changed {
		if plain, w, err = s.newPing(context.Background(), primary); err != nil {
			return err
		}
	}
	// 3. The switch, with its ping block, at once, on the connection the
	// handles are of (a reconnection meanwhile renumbers them: start
	// over).
	s.mu.Lock()
	defer s.mu.Unlock()
	now, err := s.connected()
	if err != nil {
		return err
	}
	if now != c {
		return errReconnected
	}
	if changed {
		c.kekID, c.kek, c.mac, c.kwp = primary, p.kek, p.mac, p.kwp
		s.pingPlain, s.pingProfile, s.pingKEKID = plain, w, primary
	}
	c.others = map[string]kekSet{}
	s.others = nil
	for _, id := range others {
		if ks, ok := sets[id]; ok && id != primary {
			c.others[id] = ks
			s.others = append(s.others, id)
			delete(c.seen, id)
		}
	}
	s.kekID, s.cfg.KEKID = primary, primary
	if changed {
		s.log.Info("HSM: KEK ring changed", "primary", primary, "others", others)
	}
	return nil
}

// KEKs returns the primary KEK's id and the others of the ring.
func (s *Sealer) KEKs() (primary string, others []string) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.kekID, slices.Clone(s.others)
}

// DestroyKEK destroys the KEK with the id and its side keys in the token
// (C_DestroyObject) and drops it from the ring: every blob still sealed
// under it is lost for good. The primary is refused.
func (s *Sealer) DestroyKEK(ctx context.Context, id string) (err error) {
	defer s.observe("destroy_kek", time.Now(), &err)
	s.mu.Lock()
	defer s.mu.Unlock()
	c, err := s.connected()
	if err != nil {
		return err
	}
	if raw, err := hex.DecodeString(id); err != nil || hex.EncodeToString(raw) != id {
		return fmt.Errorf("%w: KEK id %q is not lower-case hex", ErrKEK, id)
	}
	if id == c.kekID {
		return ErrKEKInUse
	}
	// Only a KEK of this ring: the token may hold others under the label.
	ks, ok := c.others[id]
	if !ok {
		return fmt.Errorf("%w: KEK %s is not in this sealer's ring", ErrKEKMissing, id)
	}
	for _, h := range []pkcs11.ObjectHandle{ks.mac, ks.kwp, ks.kek} {
		if h == 0 {
			continue
		}
		if err := s.mod.DestroyObject(c.loginSess, h); err != nil {
			return fmt.Errorf("destroy KEK %s in the token: %w", id, err)
		}
	}
	delete(c.others, id)
	s.others = slices.DeleteFunc(s.others, func(o string) bool { return o == id })
	s.log.Warn("HSM: KEK destroyed in the token", "kek_id", id)
	return nil
}

// BlobKEK returns the id of the KEK a blob is sealed under.
func BlobKEK(b []byte) (string, error) {
	p, err := parseBlob(b)
	if err != nil {
		return "", err
	}
	return string(p.kekID), nil
}

// BlobKEK implements kms.KEKRing.
func (s *Sealer) BlobKEK(b []byte) (string, error) { return BlobKEK(b) }

// HasKEK reports (nil) whether the token holds the KEK with the id: in
// the ring, or found in the token by label and id (then added to it).
func (s *Sealer) HasKEK(id string) error { return s.knows(id) }

// FindKEK adds to the ring the KEK with the id, found in the token (never
// made), and checks that it round-trips: a rotation another process
// started made it.
func (s *Sealer) FindKEK(ctx context.Context, id string) error {
	s.mu.Lock()
	c, err := s.connected()
	if err != nil {
		s.mu.Unlock()
		return err
	}
	if id != c.kekID {
		ks, err := s.findSet(c, id, false)
		if err != nil {
			s.mu.Unlock()
			return err
		}
		c.others[id] = ks
		if !slices.Contains(s.others, id) {
			s.others = append(s.others, id)
		}
	}
	s.mu.Unlock()
	return s.runWith(ctx, id, func(sh pkcs11.SessionHandle, k keys) error { return s.pingKEK(sh, k, s.profile) })
}
