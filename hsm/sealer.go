package hsm

import (
	"bytes"
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/miekg/pkcs11"

	"github.com/kmsd-project/kmsd/kms"
)

// Config opens a Sealer.
type Config struct {
	// Module is the path of the PKCS#11 library. Ignored if Loaded is set.
	Module string
	// Loaded is an already loaded module (tests wrap one to inject faults).
	Loaded Module
	// TokenLabel finds the token. Slot numbers are never used: SoftHSM
	// reassigns them.
	TokenLabel string
	// PIN is the user PIN.
	PIN string
	// KEKLabel names the KEK object (default "kmsd-kek").
	KEKLabel string
	// KEKID, if set (hex), is the KEK's CKA_ID as the store recorded it:
	// the KEK is then found by label and id, so other keys of the same
	// label (another data dir's, made on the same token) do not matter.
	KEKID string
	// CreateKEK allows Open to generate the KEK when the token has none
	// with the label: only for a brand-new data dir. Otherwise a missing
	// KEK stops Open (ErrKEKMissing): never a second KEK by accident.
	CreateKEK bool
	// Sessions bounds the session pool (default 8).
	Sessions int
	// Profile is how the KEK protects data keys (default ProfileAuto:
	// the first the token can do). Blobs sealed under any profile open
	// as long as the token offers it.
	Profile Profile
	// Logger receives connection losses and re-establishments.
	Logger *slog.Logger
}

// Sealer is a kms.Sealer over a PKCS#11 token. When the token goes away
// while kmsd runs (removed, its files moved, a session or the KEK handle
// invalidated), every operation fails fast as unavailable and a supervisor
// re-establishes the connection with back-off: module re-initialized (when
// the sealer initialized it), token found by label, login (never retried
// after the PIN is refused), KEK found by label (never created) and checked
// to be the same key, sessions opened anew, a round trip tested.
type Sealer struct {
	mod     Module
	cfg     Config
	kekID   string   // hex of the primary KEK's CKA_ID (guarded by mu once open)
	others  []string // the other KEKs of the ring (guarded by mu)
	profile Profile  // what Seal uses
	ivs     ivGuard
	// ping is a random block wrapped at start: Ping unwraps it, so a
	// health check spends no IV under the KEK.
	pingPlain   []byte
	pingProfile wrapped
	pingKEKID   string // the KEK the ping block is wrapped under
	finalize    bool
	log         *slog.Logger

	mu     sync.RWMutex // operations hold it shared while they use c; reconnect and Close exclusively
	c      *conn        // nil while disconnected
	closed bool

	hmu         sync.Mutex
	healthy     bool
	lastErr     error
	supervising bool
	pinRefused  bool
	reconnects  atomic.Uint64
	closeOnce   sync.Once
	observer    atomic.Pointer[Observer]
}

// Observer is told of each operation on the token (seal, unseal, ping,
// generate_kek, destroy_kek): its name, how long it took and how it
// ended. It must be fast; it runs on the caller's goroutine.
type Observer func(op string, d time.Duration, err error)

// SetObserver sets the observer (metrics); nil removes it.
func (s *Sealer) SetObserver(o Observer) {
	if o == nil {
		s.observer.Store(nil)
		return
	}
	s.observer.Store(&o)
}

// observe reports an operation that started at start; use it deferred.
func (s *Sealer) observe(op string, start time.Time, err *error) {
	if o := s.observer.Load(); o != nil {
		(*o)(op, time.Since(start), *err)
	}
}

// Connected reports whether the token is reachable now (false while
// reconnecting).
func (s *Sealer) Connected() bool {
	s.hmu.Lock()
	defer s.hmu.Unlock()
	return s.healthy
}

// conn is one established connection to the token.
type conn struct {
	slot      uint
	kekID     string            // the primary KEK's id (the handles below are its)
	others    map[string]kekSet // the other KEKs of the ring, by id: they open, never seal
	seen      map[string]kekSet // KEKs met in blobs and found in the token: they open, are never reported nor destroyed
	kek       pkcs11.ObjectHandle
	mac       pkcs11.ObjectHandle // the cbc-hmac profile's MAC key, 0 if none
	kwp       pkcs11.ObjectHandle // the kwp profile's wrap-only key, 0 if none
	kwpErr    error               // the token's key wrap failed its known answer
	have      map[uint]bool       // the token's mechanisms
	ivs       *ivGuard            // shared by the connections of one sealer
	loginSess pkcs11.SessionHandle
	pool      *pool
}

var _ kms.Sealer = (*Sealer)(nil)

const (
	defaultKEKLabel = "kmsd-kek"
	dekSize         = 32
	gcmNonce        = 12
	gcmTagBits      = 128
)

// Back-off between reconnection attempts.
var (
	reconnectFirst = 100 * time.Millisecond
	reconnectMax   = 2 * time.Second
)

// ErrDisconnected is returned while the token is unreachable.
var ErrDisconnected = errors.New("the HSM is unreachable; reconnecting")

// Open loads the module, finds the token by label, logs in, checks the
// mechanisms, finds (or, with CreateKEK, creates) the KEK, checks its
// attributes and runs the self-test. Any failure closes what was opened and
// returns an error naming the cause (never the PIN).
func Open(cfg Config) (_ *Sealer, err error) {
	if cfg.KEKLabel == "" {
		cfg.KEKLabel = defaultKEKLabel
	}
	if cfg.Sessions <= 0 {
		cfg.Sessions = 8
	}
	if cfg.Profile == "" {
		cfg.Profile = ProfileAuto
	}
	if _, err := ParseProfile(string(cfg.Profile)); err != nil {
		return nil, err
	}
	mod := cfg.Loaded
	if mod == nil {
		if mod, err = LoadModule(cfg.Module); err != nil {
			return nil, err
		}
	}
	s := &Sealer{mod: mod, cfg: cfg, log: cfg.Logger, healthy: true}
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	if err := mod.Initialize(); err != nil {
		if rv(err) != pkcs11.CKR_CRYPTOKI_ALREADY_INITIALIZED {
			// Not unloaded (see Close).
			return nil, fmt.Errorf("%w: C_Initialize: %v", ErrModule, err)
		}
	} else {
		s.finalize = true
	}
	defer func() {
		if err != nil {
			s.Close()
		}
	}()
	c, kekID, err := s.connect(cfg.CreateKEK)
	if errors.Is(err, ErrTokenNotFound) && s.finalize {
		// opencryptoki 3.8 drops a slot from what C_Initialize finds
		// when another process writes the token at that moment: once
		// more, initialized anew.
		_ = mod.Finalize()
		if ierr := mod.Initialize(); ierr == nil {
			c, kekID, err = s.connect(cfg.CreateKEK)
		}
	}
	s.c = c
	if err != nil {
		return nil, err
	}
	s.kekID = kekID
	s.cfg.KEKID = kekID // reconnections find this KEK, by label and id
	if s.profile, err = s.chooseProfile(c); err != nil {
		return nil, err
	}
	if err := s.selfTest(); err != nil {
		return nil, err
	}
	if err := s.makePing(); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrSelfTest, err)
	}
	return s, nil
}

// connect establishes a connection: token by label, a login session, the
// mechanisms, the KEK by label (created only if create), its attributes,
// and a session pool. On failure it closes what it opened; c may still be
// returned half made for shutdown to close.
func (s *Sealer) connect(create bool) (c *conn, kekID string, err error) {
	c = &conn{ivs: &s.ivs}
	defer func() {
		if err != nil {
			s.closeConn(c)
			c = nil
		}
	}()
	if c.slot, err = FindToken(s.mod, s.cfg.TokenLabel); err != nil {
		return c, "", err
	}
	c.loginSess, err = s.mod.OpenSession(c.slot, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
	if err != nil {
		return c, "", fmt.Errorf("open session on token %q: %w", s.cfg.TokenLabel, err)
	}
	if err := s.mod.Login(c.loginSess, pkcs11.CKU_USER, s.cfg.PIN); err != nil {
		switch rv(err) {
		case pkcs11.CKR_USER_ALREADY_LOGGED_IN:
		case pkcs11.CKR_PIN_INCORRECT, pkcs11.CKR_PIN_INVALID, pkcs11.CKR_PIN_LEN_RANGE:
			return c, "", fmt.Errorf("token %q: %w", s.cfg.TokenLabel, ErrPINIncorrect)
		case pkcs11.CKR_PIN_LOCKED:
			return c, "", fmt.Errorf("token %q: %w", s.cfg.TokenLabel, ErrPINLocked)
		default:
			return c, "", fmt.Errorf("log in to token %q: %w", s.cfg.TokenLabel, err)
		}
	}
	if c.have, err = mechanisms(s.mod, c.slot); err != nil {
		return c, "", err
	}
	if create && !c.have[pkcs11.CKM_AES_KEY_GEN] {
		return c, "", fmt.Errorf("%w: CKM_AES_KEY_GEN (to make the KEK)", ErrMechanism)
	}
	if c.kek, kekID, err = findOrCreateKEK(s.mod, c.loginSess, s.cfg.KEKLabel, s.cfg.KEKID, create); err != nil {
		return c, "", err
	}
	// The cbc-hmac profile's MAC key, made beside the KEK when the token
	// can do that profile (only with a new KEK), found if it is there.
	// Under auto each is made where the token allows it: a token whose
	// policy refuses one (a wrap key, say) still starts, without that
	// profile.
	makeMAC := create && ProfileCBCHMAC.lacks(c.have) == "" && (s.cfg.Profile == ProfileCBCHMAC || s.cfg.Profile == ProfileAuto)
	if c.mac, err = s.sideKey(c, macKey, s.cfg.KEKLabel+"-mac", kekID, makeMAC); err != nil {
		return c, "", err
	}
	// Likewise the kwp profile's wrap-only key.
	makeKWP := create && ProfileKWP.lacks(c.have) == "" && (s.cfg.Profile == ProfileKWP || s.cfg.Profile == ProfileAuto)
	if c.kwp, err = s.sideKey(c, kwpKey, s.cfg.KEKLabel+"-kwp", kekID, makeKWP); err != nil {
		return c, "", err
	}
	if c.kwp != 0 {
		// CKM_AES_KEY_WRAP_PAD is RFC 5649 on some tokens and PKCS#7
		// padding then RFC 3394 on others, and firmware changes: a
		// known answer at every connection, so that kwp is used (and
		// kwp blobs are opened) only where the token's answers are RFC
		// 5649's.
		if kerr := s.knownAnswerKWP(c.loginSess, kwpMechanism(c.have)); kerr != nil {
			c.kwpErr = fmt.Errorf("%w: the token's AES key wrap fails its known answer: %v", ErrMechanism, kerr)
			s.log.Warn("HSM: the kwp profile is not usable on this token", "err", c.kwpErr.Error())
		}
	}
	c.kekID = kekID
	c.others, c.seen = map[string]kekSet{}, map[string]kekSet{}
	for _, id := range s.others {
		if id == kekID {
			continue
		}
		ks, err := s.findSet(c, id, false)
		if errors.Is(err, ErrKEKMissing) {
			// Retired meanwhile (by another process of the store): what
			// was sealed under it was sealed again before. Only the
			// primary must be there.
			s.log.Warn("HSM: a KEK of the ring is no longer in the token; dropped from the ring", "kek_id", id)
			continue
		}
		if err != nil {
			return c, "", fmt.Errorf("KEK %s of the ring: %w", id, err)
		}
		c.others[id] = ks
	}
	c.pool = newPool(s.mod, c.slot, s.cfg.Sessions)
	return c, kekID, nil
}

// closeConn closes a connection's sessions, best effort.
func (s *Sealer) closeConn(c *conn) {
	if c == nil {
		return
	}
	if c.pool != nil {
		c.pool.close()
	}
	if c.loginSess != 0 { // CK_INVALID_HANDLE is 0
		_ = s.mod.Logout(c.loginSess)
		_ = s.mod.CloseSession(c.loginSess)
	}
}

// reconnectable reports whether err means the connection to the token (a
// session, the login, the KEK handle or the token itself) is gone, so that
// only a reconnection can help.
func reconnectable(err error) bool {
	switch rv(err) {
	case pkcs11.CKR_OBJECT_HANDLE_INVALID, pkcs11.CKR_KEY_HANDLE_INVALID, pkcs11.CKR_SESSION_HANDLE_INVALID,
		pkcs11.CKR_SESSION_CLOSED, pkcs11.CKR_TOKEN_NOT_PRESENT, pkcs11.CKR_TOKEN_NOT_RECOGNIZED,
		pkcs11.CKR_DEVICE_REMOVED, pkcs11.CKR_DEVICE_ERROR, pkcs11.CKR_USER_NOT_LOGGED_IN,
		pkcs11.CKR_CRYPTOKI_NOT_INITIALIZED, pkcs11.CKR_SLOT_ID_INVALID:
		return true
	}
	return false
}

// broke marks the connection lost and starts the supervisor.
func (s *Sealer) broke(err error) {
	s.hmu.Lock()
	defer s.hmu.Unlock()
	s.lastErr = err
	if s.healthy {
		s.healthy = false
		s.log.Error("HSM: connection lost; operations answer unavailable until it is re-established", "err", err)
	}
	if !s.supervising && !s.pinRefused {
		s.supervising = true
		go s.supervise()
	}
}

// supervise reconnects with back-off until it succeeds, the PIN is
// refused (never retried: that would lock the token) or the sealer closes.
func (s *Sealer) supervise() {
	wait := reconnectFirst
	for {
		time.Sleep(wait)
		err := s.reconnect()
		s.hmu.Lock()
		switch {
		case err == nil:
			s.healthy, s.lastErr, s.supervising = true, nil, false
			s.hmu.Unlock()
			s.reconnects.Add(1)
			s.log.Info("HSM: connection re-established", "token", s.cfg.TokenLabel, "kek_id", s.KEKID())
			return
		case errors.Is(err, ErrClosed):
			s.supervising = false
			s.hmu.Unlock()
			return
		case errors.Is(err, ErrPINIncorrect) || errors.Is(err, ErrPINLocked) || errors.Is(err, ErrKEKChanged):
			s.pinRefused, s.supervising, s.lastErr = true, false, err
			s.hmu.Unlock()
			s.log.Error("HSM: not reconnecting: restart kmsd once the cause is fixed", "err", err)
			return
		}
		s.lastErr = err
		s.hmu.Unlock()
		wait = min(2*wait, reconnectMax)
	}
}

// ErrKEKChanged: after a reconnection the KEK found by label is another key.
var ErrKEKChanged = errors.New("the key found by the KEK's label is not the KEK this sealer was using")

// reconnect drops the connection and makes a new one. The module is
// re-initialized when this sealer initialized it (SoftHSM, for one, reads
// its token directory again only then).
func (s *Sealer) reconnect() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return ErrClosed
	}
	s.closeConn(s.c)
	s.c = nil
	if s.finalize {
		_ = s.mod.Finalize()
		if err := s.mod.Initialize(); err != nil && rv(err) != pkcs11.CKR_CRYPTOKI_ALREADY_INITIALIZED {
			return fmt.Errorf("C_Initialize: %w", err)
		}
	}
	c, kekID, err := s.connect(false)
	if err != nil {
		return err
	}
	if kekID != s.kekID {
		s.closeConn(c)
		return fmt.Errorf("%w: id %s, was %s", ErrKEKChanged, kekID, s.kekID)
	}
	if lacks := s.profile.lacks(c.have); lacks != "" || (s.profile == ProfileCBCHMAC && c.mac == 0) || (s.profile == ProfileKWP && (c.kwp == 0 || c.kwpErr != nil)) {
		s.closeConn(c)
		return fmt.Errorf("%w: after reconnecting, the token no longer offers the %s profile (%s)", ErrMechanism, s.profile, lacks)
	}
	// A round trip through the KEK before anyone relies on it; and the
	// ping block wrapped again if the primary changed while the
	// connection was down (SetRing records the store's ring then).
	err = c.pool.with(context.Background(), func(sh pkcs11.SessionHandle) error {
		if err := s.pingKEK(sh, c.keys(), s.profile); err != nil {
			return err
		}
		if s.pingKEKID == kekID {
			return nil
		}
		plain := make([]byte, dekSize)
		if _, err := io.ReadFull(rand.Reader, plain); err != nil {
			return err
		}
		w, err := wrap(s.mod, sh, c.keys(), s.profile, []byte("kmsd ping"), plain)
		if err == nil {
			s.pingPlain, s.pingProfile, s.pingKEKID = plain, w, kekID
		}
		return err
	})
	if err != nil {
		s.closeConn(c)
		return err
	}
	s.c = c
	return nil
}

// Reconnects counts re-established connections.
func (s *Sealer) Reconnects() uint64 { return s.reconnects.Load() }

// FindToken returns the slot holding the initialized token with the label.
func FindToken(mod Module, label string) (uint, error) {
	slots, err := mod.GetSlotList(true)
	if err != nil {
		return 0, fmt.Errorf("list slots: %w", err)
	}
	for _, slot := range slots {
		ti, err := mod.GetTokenInfo(slot)
		if err != nil {
			continue
		}
		if ti.Label == label && ti.Flags&pkcs11.CKF_TOKEN_INITIALIZED != 0 {
			return slot, nil
		}
	}
	return 0, fmt.Errorf("%w: %q", ErrTokenNotFound, label)
}

// mechanisms lists the mechanisms the token offers.
func mechanisms(mod Module, slot uint) (map[uint]bool, error) {
	ms, err := mod.GetMechanismList(slot)
	if err != nil {
		return nil, fmt.Errorf("list mechanisms: %w", err)
	}
	have := map[uint]bool{}
	for _, m := range ms {
		have[m.Mechanism] = true
	}
	return have, nil
}

func findByLabel(mod Module, sh pkcs11.SessionHandle, label string, id ...[]byte) ([]pkcs11.ObjectHandle, error) {
	tmpl := []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, label),
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
	}
	for _, i := range id {
		tmpl = append(tmpl, pkcs11.NewAttribute(pkcs11.CKA_ID, i))
	}
	if err := mod.FindObjectsInit(sh, tmpl); err != nil {
		return nil, fmt.Errorf("find KEK: %w", err)
	}
	objs, _, err := mod.FindObjects(sh, 2)
	if ferr := mod.FindObjectsFinal(sh); err == nil {
		err = ferr
	}
	if err != nil {
		return nil, fmt.Errorf("find KEK: %w", err)
	}
	return objs, nil
}

// findOrCreateKEK finds the KEK by label or, on first start, generates it in
// the token. Either way it then checks the attributes that make it safe.
func findOrCreateKEK(mod Module, sh pkcs11.SessionHandle, label, wantID string, create bool) (pkcs11.ObjectHandle, string, error) {
	var ids [][]byte
	if wantID != "" {
		id, err := hex.DecodeString(wantID)
		if err != nil {
			return 0, "", fmt.Errorf("%w: KEK id %q is not hex", ErrKEK, wantID)
		}
		ids = append(ids, id)
		create = false // a recorded KEK is found, never made
	}
	objs, err := findByLabel(mod, sh, label, ids...)
	if err != nil {
		return 0, "", err
	}
	var kek pkcs11.ObjectHandle
	switch len(objs) {
	case 0:
		if !create {
			if wantID != "" {
				return 0, "", fmt.Errorf("%w: no key labelled %q with id %s in the token", ErrKEKMissing, label, wantID)
			}
			return 0, "", fmt.Errorf("%w: no key labelled %q in the token", ErrKEKMissing, label)
		}
		id := make([]byte, 16)
		if _, err := rand.Read(id); err != nil {
			return 0, "", err
		}
		// Encrypt and decrypt only: no wrapping of token keys, no MACs.
		kek, err = mod.GenerateKey(sh, []*pkcs11.Mechanism{pkcs11.NewMechanism(kekKey.gen, nil)}, kekKey.template(label, id))
		if err != nil {
			return 0, "", fmt.Errorf("generate KEK %q: %w", label, err)
		}
	case 1:
		kek = objs[0]
	default:
		return 0, "", fmt.Errorf("%w: more than one key is labelled %q", ErrKEK, label)
	}
	a, err := KEKAttributes(mod, sh, kek)
	if err != nil {
		return 0, "", err
	}
	if err := a.check(); err != nil {
		return 0, "", fmt.Errorf("%w: %q %v", ErrKEK, label, err)
	}
	return kek, hex.EncodeToString(a.ID), nil
}

// Attributes are the KEK attributes the sealer relies on.
type Attributes struct {
	KeyType          uint
	ValueLen         uint
	Sensitive        bool
	AlwaysSensitive  bool
	Extractable      bool
	NeverExtractable bool
	Token            bool
	ID               []byte
}

func (a Attributes) check() error {
	switch {
	case a.KeyType != pkcs11.CKK_AES || a.ValueLen != 32:
		return errors.New("is not an AES-256 key")
	case !a.Sensitive || a.Extractable || !a.AlwaysSensitive || !a.NeverExtractable:
		return errors.New("is extractable or not sensitive, or was once")
	case !a.Token:
		return errors.New("is not a token object")
	case len(a.ID) == 0:
		return errors.New("has no CKA_ID")
	}
	return nil
}

// KEKAttributes reads the attributes of a KEK object back from the token.
func KEKAttributes(mod Module, sh pkcs11.SessionHandle, kek pkcs11.ObjectHandle) (Attributes, error) {
	attrs, err := mod.GetAttributeValue(sh, kek, []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, nil),
		pkcs11.NewAttribute(pkcs11.CKA_VALUE_LEN, nil),
		pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, nil),
		pkcs11.NewAttribute(pkcs11.CKA_ALWAYS_SENSITIVE, nil),
		pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, nil),
		pkcs11.NewAttribute(pkcs11.CKA_NEVER_EXTRACTABLE, nil),
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, nil),
		pkcs11.NewAttribute(pkcs11.CKA_ID, nil),
	})
	if err != nil {
		return Attributes{}, fmt.Errorf("read KEK attributes: %w", err)
	}
	var a Attributes
	for _, at := range attrs {
		switch at.Type {
		case pkcs11.CKA_KEY_TYPE:
			a.KeyType = ulong(at.Value)
		case pkcs11.CKA_VALUE_LEN:
			a.ValueLen = ulong(at.Value)
		case pkcs11.CKA_SENSITIVE:
			a.Sensitive = boolean(at.Value)
		case pkcs11.CKA_ALWAYS_SENSITIVE:
			a.AlwaysSensitive = boolean(at.Value)
		case pkcs11.CKA_EXTRACTABLE:
			a.Extractable = boolean(at.Value)
		case pkcs11.CKA_NEVER_EXTRACTABLE:
			a.NeverExtractable = boolean(at.Value)
		case pkcs11.CKA_TOKEN:
			a.Token = boolean(at.Value)
		case pkcs11.CKA_ID:
			a.ID = bytes.Clone(at.Value)
		}
	}
	return a, nil
}

// ulong decodes a CK_ULONG attribute (native byte order, native size).
func ulong(b []byte) uint {
	switch len(b) {
	case 8:
		return uint(binary.NativeEndian.Uint64(b))
	case 4:
		return uint(binary.NativeEndian.Uint32(b))
	}
	return 0
}

func boolean(b []byte) bool { return len(b) == 1 && b[0] != 0 }

// KEKAttributes reads the sealer's KEK attributes from the token.
func (s *Sealer) KEKAttributes(ctx context.Context) (Attributes, error) {
	var a Attributes
	err := s.run(ctx, func(sh pkcs11.SessionHandle, k keys) error {
		var err error
		a, err = KEKAttributes(s.mod, sh, k.kek)
		return err
	})
	return a, err
}

// KEKID is the hex CKA_ID of the KEK; it is bound into every blob's AAD.
func (s *Sealer) KEKID() string {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.kekID
}

// Blob layouts. Version 1, the gcm profile (the layout kmsd wrote before
// it had profiles, and still writes for gcm):
//
//	"KMS1" | u16 len(kekID) | kekID | 12-byte wrap IV | u16 len(wrappedDEK) | wrappedDEK |
//	12-byte data nonce | AES-256-GCM(DEK, nonce, plaintext, AAD)
//
// Version 2, every other profile:
//
//	"KMS2" | profile id | u16 len(kekID) | kekID | u16 len(IV) | IV | u16 len(wrappedDEK) |
//	wrappedDEK | u16 len(MAC) | MAC | 12-byte data nonce | AES-256-GCM(DEK, nonce, plaintext, AAD)
//
// wrappedDEK is the DEK under the KEK, computed inside the HSM by the
// profile (wrap.go), which authenticates the AAD (kms.SealContext.AAD)
// too; so does the data layer, so a blob moved to another key, version,
// kind or KEK fails to open.
var (
	blobMagic  = []byte("KMS1")
	blobMagic2 = []byte("KMS2")
)

// ErrBlob is returned for a blob that does not open: corrupted, truncated, or
// sealed for another key, version, kind or KEK.
var ErrBlob = errors.New("sealed blob does not open in this context")

// Profile is the wrap profile this sealer seals with.
func (s *Sealer) Profile() Profile { return s.profile }

// Seal implements kms.Sealer.
func (s *Sealer) Seal(ctx context.Context, sc kms.SealContext, plaintext kms.Secret) (_ []byte, err error) {
	defer s.observe("seal", time.Now(), &err)
	dek := make([]byte, dekSize)
	defer clear(dek)
	nonce := make([]byte, gcmNonce)
	if _, err := io.ReadFull(rand.Reader, dek); err != nil {
		return nil, err
	}
	if _, err := io.ReadFull(rand.Reader, nonce); err != nil {
		return nil, err
	}
	var w wrapped
	var aad []byte
	var kekID string
	err = s.run(ctx, func(sh pkcs11.SessionHandle, k keys) error {
		// The primary KEK, as of this operation (a rotation may switch
		// it between two).
		kekID, aad = k.id, sc.AAD(k.id)
		var err error
		w, err = wrap(s.mod, sh, k, s.profile, aad, dek)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("wrap DEK (profile %s): %w", s.profile, err)
	}
	aead, err := newGCM(dek)
	if err != nil {
		return nil, err
	}
	out := blob{kekID: []byte(kekID), w: w, nonce: nonce}.header()
	return aead.Seal(out, nonce, plaintext.Reveal(), aad), nil
}

// header encodes the blob up to its data ciphertext.
func (p blob) header() []byte {
	var out []byte
	if p.w.profile == ProfileGCM {
		out = append(out, blobMagic...)
		out = binary.BigEndian.AppendUint16(out, uint16(len(p.kekID)))
		out = append(out, p.kekID...)
		out = append(out, p.w.iv...)
		out = binary.BigEndian.AppendUint16(out, uint16(len(p.w.ct)))
		out = append(out, p.w.ct...)
	} else {
		out = append(out, blobMagic2...)
		out = append(out, profileIDs[p.w.profile])
		for _, f := range [][]byte{p.kekID, p.w.iv, p.w.ct, p.w.mac} {
			out = binary.BigEndian.AppendUint16(out, uint16(len(f)))
			out = append(out, f...)
		}
	}
	return append(out, p.nonce...)
}

func newGCM(key []byte) (cipher.AEAD, error) {
	b, err := aes.NewCipher(key)
	if err != nil {
		return nil, err
	}
	return cipher.NewGCM(b)
}

type blob struct {
	kekID []byte
	w     wrapped
	nonce []byte
	ct    []byte
}

func parseBlob(b []byte) (blob, error) {
	var p blob
	take := func(n int) []byte {
		if n < 0 || len(b) < n {
			b = nil
			return nil
		}
		v := b[:n]
		b = b[n:]
		return v
	}
	lenField := func() int {
		v := take(2)
		if v == nil {
			return -1
		}
		return int(binary.BigEndian.Uint16(v))
	}
	switch {
	case bytes.HasPrefix(b, blobMagic):
		b = b[len(blobMagic):]
		p.w.profile = ProfileGCM
		p.kekID = take(lenField())
		p.w.iv = take(gcmNonce)
		p.w.ct = take(lenField())
	case bytes.HasPrefix(b, blobMagic2) && len(b) > len(blobMagic2):
		id := b[len(blobMagic2)]
		b = b[len(blobMagic2)+1:]
		for pr, pid := range profileIDs {
			if pid == id {
				p.w.profile = pr
			}
		}
		if p.w.profile == "" || p.w.profile == ProfileGCM {
			return p, ErrBlob
		}
		p.kekID = take(lenField())
		p.w.iv = take(lenField())
		p.w.ct = take(lenField())
		p.w.mac = take(lenField())
		if p.w.mac == nil {
			return p, ErrBlob
		}
	default:
		return p, ErrBlob
	}
	p.nonce = take(gcmNonce)
	p.ct = b
	if p.kekID == nil || p.w.iv == nil || p.w.ct == nil || p.nonce == nil || len(p.ct) < 16 || !p.w.sizesOK() {
		return p, ErrBlob
	}
	return p, nil
}

// Unseal implements kms.Sealer.
func (s *Sealer) Unseal(ctx context.Context, sc kms.SealContext, b []byte) (_ kms.Secret, err error) {
	defer s.observe("unseal", time.Now(), &err)
	p, err := parseBlob(b)
	if err != nil {
		return kms.Secret{}, kms.Wrap(kms.KindInternal, "unseal", err)
	}
	if err := s.knows(string(p.kekID)); err != nil {
		return kms.Secret{}, kms.Wrap(kms.KindInternal, "unseal", err)
	}
	aad := sc.AAD(string(p.kekID))
	var dek []byte
	err = s.runWith(ctx, string(p.kekID), func(sh pkcs11.SessionHandle, k keys) error {
		if lacks := p.w.profile.lacks(k.have); lacks != "" {
			return fmt.Errorf("%w: the blob was sealed with the %s profile, and the token lacks %s", ErrMechanism, p.w.profile, lacks)
		}
		var err error
		dek, err = unwrap(s.mod, sh, k, aad, p.w)
		return err
	})
	if errors.Is(err, errGeneral) {
		// A bad tag on SoftHSM, or a failing token: if the token still
		// round-trips through the blob's profile, it was the blob.
		if perr := s.roundTrip(ctx, p.w.profile); perr != nil {
			return kms.Secret{}, fmt.Errorf("unwrap DEK: %w (and the token fails a %s round trip: %v)", err, p.w.profile, perr)
		}
		err = errTag
	}
	if errors.Is(err, errTag) {
		return kms.Secret{}, kms.Wrap(kms.KindInternal, "unseal", ErrBlob)
	}
	if errors.Is(err, errNoSideKey) {
		return kms.Secret{}, kms.Wrap(kms.KindInternal, "unseal", fmt.Errorf("%w: %v", ErrBlob, err))
	}
	if err != nil {
		return kms.Secret{}, fmt.Errorf("unwrap DEK: %w", err)
	}
	defer clear(dek)
	if len(dek) != dekSize {
		return kms.Secret{}, kms.Wrap(kms.KindInternal, "unseal", ErrBlob)
	}
	aead, err := newGCM(dek)
	if err != nil {
		return kms.Secret{}, kms.Wrap(kms.KindInternal, "unseal", ErrBlob)
	}
	pt, err := aead.Open(nil, p.nonce, p.ct, aad)
	if err != nil {
		return kms.Secret{}, kms.Wrap(kms.KindInternal, "unseal", ErrBlob)
	}
	return kms.NewSecret(pt), nil
}

// Ping implements kms.Sealer: it encrypts with the KEK in the token, so it
// fails whenever sealing and unsealing would.
func (s *Sealer) Ping(ctx context.Context) (err error) {
	defer s.observe("ping", time.Now(), &err)
	return s.run(ctx, func(sh pkcs11.SessionHandle, k keys) error {
		got, err := unwrap(s.mod, sh, k, []byte("kmsd ping"), s.pingProfile)
		if err != nil {
			return err
		}
		if !bytes.Equal(got, s.pingPlain) {
			return errors.New("the token's unwrap of the ping block gave back other bytes")
		}
		return nil
	})
}

// roundTrip checks that the token still does profile p: Ping where p is
// the profile this sealer seals with (or another AES-GCM one: the same
// decryption), otherwise a wrap and unwrap under p.
func (s *Sealer) roundTrip(ctx context.Context, p Profile) error {
	gcm := func(p Profile) bool { return p == ProfileGCM || p == ProfileGCMHSMIV }
	if p == s.profile || (gcm(p) && gcm(s.profile)) {
		return s.Ping(ctx)
	}
	if gcm(p) {
		// A GCM blob on a sealer of another profile: either GCM profile
		// round-tripping shows the token's AES-GCM works.
		err := s.run(ctx, func(sh pkcs11.SessionHandle, k keys) error { return s.pingKEK(sh, k, ProfileGCM) })
		if err == nil {
			return nil
		}
		p = ProfileGCMHSMIV
	}
	return s.run(ctx, func(sh pkcs11.SessionHandle, k keys) error { return s.pingKEK(sh, k, p) })
}

// makePing wraps the block Ping unwraps (at Open, before the sealer is
// shared).
func (s *Sealer) makePing() error {
	plain, w, err := s.newPing(context.Background(), "")
	if err != nil {
		return err
	}
	s.pingPlain, s.pingProfile, s.pingKEKID = plain, w, s.kekID
	return nil
}

// newPing wraps a fresh ping block under the KEK kekID ("": the primary).
func (s *Sealer) newPing(ctx context.Context, kekID string) ([]byte, wrapped, error) {
	plain := make([]byte, dekSize)
	if _, err := io.ReadFull(rand.Reader, plain); err != nil {
		return nil, wrapped{}, err
	}
	var w wrapped
	err := s.runWith(ctx, kekID, func(sh pkcs11.SessionHandle, k keys) error {
		var err error
		w, err = wrap(s.mod, sh, k, s.profile, []byte("kmsd ping"), plain)
		return err
	})
	return plain, w, err
}

// pingKEK wraps a random block with the KEK under profile p and unwraps
// it back.
func (s *Sealer) pingKEK(sh pkcs11.SessionHandle, k keys, p Profile) error {
	buf := make([]byte, 32)
	if _, err := io.ReadFull(rand.Reader, buf); err != nil {
		return err
	}
	aad := []byte("kmsd ping")
	w, err := wrap(s.mod, sh, k, p, aad, buf)
	if err != nil {
		return err
	}
	got, err := unwrap(s.mod, sh, k, aad, w)
	if err != nil {
		return err
	}
	if !bytes.Equal(got, buf) {
		return fmt.Errorf("the token's %s round trip gave back other bytes", p)
	}
	return nil
}

// run runs fn on a session of the current connection with its KEK handle.
// While the connection is lost it fails at once (ErrDisconnected, with the
// cause); an error that means the connection is gone starts reconnection.
func (s *Sealer) run(ctx context.Context, fn func(pkcs11.SessionHandle, keys) error) error {
	return s.runWith(ctx, "", fn)
}

// runWith is run with the keys of the KEK kekID ("": the primary).
func (s *Sealer) runWith(ctx context.Context, kekID string, fn func(pkcs11.SessionHandle, keys) error) error {
	s.mu.RLock()
	if s.closed {
		s.mu.RUnlock()
		return ErrClosed
	}
	s.hmu.Lock()
	healthy, last := s.healthy, s.lastErr
	s.hmu.Unlock()
	c := s.c
	if !healthy || c == nil {
		s.mu.RUnlock()
		return fmt.Errorf("%w: %v", ErrDisconnected, last)
	}
	k := c.keys()
	if kekID != "" {
		var ok bool
		if k, ok = c.keysOf(kekID); !ok {
			s.mu.RUnlock()
			return fmt.Errorf("%w: sealed under KEK %s, which this sealer does not hold", ErrBlob, kekID)
		}
	}
	err := c.pool.with(ctx, func(sh pkcs11.SessionHandle) error { return fn(sh, k) })
	s.mu.RUnlock()
	if reconnectable(err) {
		s.broke(err)
	}
	return err
}

// Close closes every session, logs out and finalizes the module. A
// reconnection under way finishes first; none starts after.
func (s *Sealer) Close() error {
	s.closeOnce.Do(func() {
		s.mu.Lock()
		defer s.mu.Unlock()
		s.closed = true
		s.closeConn(s.c)
		s.c = nil
		if s.finalize {
			_ = s.mod.Finalize()
		}
		// The library stays loaded (no dlclose): opencryptoki 3.8
		// crashes in C_Initialize when it is loaded again in the same
		// process after being unloaded.
	})
	return nil
}

func (c *conn) keys() keys {
	return keys{id: c.kekID, kek: c.kek, mac: c.mac, kwp: c.kwp, kwpErr: c.kwpErr, have: c.have, ivs: c.ivs}
}

// keysOf is the keys of the KEK with the id, primary or other.
func (c *conn) keysOf(id string) (keys, bool) {
	if id == c.kekID {
		return c.keys(), true
	}
	o, ok := c.others[id]
	if !ok {
		if o, ok = c.seen[id]; !ok {
			return keys{}, false
		}
	}
	return keys{id: id, kek: o.kek, mac: o.mac, kwp: o.kwp, kwpErr: c.kwpErr, have: c.have, ivs: c.ivs}, true
}

// chooseProfile picks the profile Seal uses: the configured one if the
// token can do it, or with ProfileAuto the first of Profiles that it can
// (a token that lists CKM_AES_GCM but refuses an IV from the application,
// or does not use it, is found by trying). It names what the token lacks.
func (s *Sealer) chooseProfile(c *conn) (Profile, error) {
	// A profile whose mechanisms the token lacks is ErrMechanism; one
	// whose mechanisms it lists but whose round trip fails, ErrSelfTest.
	tried := false
	try := func(p Profile) error {
		if lacks := p.lacks(c.have); lacks != "" {
			return fmt.Errorf("%w: %s", ErrMechanism, lacks)
		}
		if p == ProfileCBCHMAC && c.mac == 0 {
			return fmt.Errorf("%w: no MAC key labelled %q beside the KEK (kmsd makes it only with a new KEK)", ErrMechanism, s.cfg.KEKLabel+"-mac")
		}
		if p == ProfileKWP && c.kwp == 0 {
			return fmt.Errorf("%w: no key-wrap key labelled %q beside the KEK (kmsd makes it only with a new KEK)", ErrMechanism, s.cfg.KEKLabel+"-kwp")
		}
		if p == ProfileKWP && c.kwpErr != nil {
			return fmt.Errorf("%w: %v", ErrSelfTest, c.kwpErr)
		}
		tried = true
		if err := c.pool.with(context.Background(), func(sh pkcs11.SessionHandle) error { return s.pingKEK(sh, c.keys(), p) }); err != nil {
			return fmt.Errorf("%w: round trip: %v", ErrSelfTest, err)
		}
		return nil
	}
	if s.cfg.Profile != ProfileAuto {
		if err := try(s.cfg.Profile); err != nil {
			return "", fmt.Errorf("wrap profile %s: %w", s.cfg.Profile, err)
		}
		return s.cfg.Profile, nil
	}
	var why []string
	for _, p := range Profiles {
		err := try(p)
		if err == nil {
			s.log.Info("HSM: wrap profile chosen", "profile", string(p))
			return p, nil
		}
		why = append(why, fmt.Sprintf("%s: %v", p, err))
	}
	kind := ErrMechanism
	if tried {
		kind = ErrSelfTest
	}
	return "", fmt.Errorf("%w: the token can do no wrap profile (%s)", kind, strings.Join(why, "; "))
}

// sideKey is a key kmsd makes in the token: the KEK, and the keys a
// profile uses beside it, made with it and bearing its id (cbc-hmac's MAC
// key, kwp's wrap-only key). Each can do one thing.
type sideKey struct {
	name    string // for messages
	keyType uint
	gen     uint // the key generation mechanism
	crypt   bool // CKA_ENCRYPT, CKA_DECRYPT (the KEK)
	sign    bool // CKA_SIGN, CKA_VERIFY
	wrap    bool // CKA_WRAP, CKA_UNWRAP
}

var (
	kekKey = sideKey{name: "KEK", keyType: pkcs11.CKK_AES, gen: pkcs11.CKM_AES_KEY_GEN, crypt: true}
	macKey = sideKey{name: "MAC key", keyType: pkcs11.CKK_GENERIC_SECRET, gen: pkcs11.CKM_GENERIC_SECRET_KEY_GEN, sign: true}
	kwpKey = sideKey{name: "key-wrap key", keyType: pkcs11.CKK_AES, gen: pkcs11.CKM_AES_KEY_GEN, wrap: true}
)

// allowed is CKA_ALLOWED_MECHANISMS for the side key: the one thing it is
// for (where the token knows the attribute, it refuses any other
// mechanism with the key, such as AES-CBC wrapping with the key-wrap key).
func (k sideKey) allowed() *pkcs11.Attribute {
	var ms []uint
	if k.wrap {
		ms = []uint{pkcs11.CKM_AES_KEY_WRAP_PAD, ckmAESKeyWrapKWP}
	} else {
		ms = []uint{pkcs11.CKM_SHA256_HMAC}
	}
	var v []byte
	for _, m := range ms {
		v = append(v, pkcs11.NewAttribute(0, m).Value...) // a CK_ULONG each
	}
	return pkcs11.NewAttribute(pkcs11.CKA_ALLOWED_MECHANISMS, v)
}

// template is the key: 256 bits, in the token, sensitive, never
// extractable, with the KEK's id, and able to do one thing: encrypt and
// decrypt (the KEK), sign (the MAC key) or wrap (the key-wrap key).
func (k sideKey) template(label string, id []byte) []*pkcs11.Attribute {
	return []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, k.keyType),
		pkcs11.NewAttribute(pkcs11.CKA_VALUE_LEN, 32),
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
		pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true),
		pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, true),
		pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, false),
		pkcs11.NewAttribute(pkcs11.CKA_SIGN, k.sign),
		pkcs11.NewAttribute(pkcs11.CKA_VERIFY, k.sign),
		pkcs11.NewAttribute(pkcs11.CKA_ENCRYPT, k.crypt),
		pkcs11.NewAttribute(pkcs11.CKA_DECRYPT, k.crypt),
		pkcs11.NewAttribute(pkcs11.CKA_WRAP, k.wrap),
		pkcs11.NewAttribute(pkcs11.CKA_UNWRAP, k.wrap),
		pkcs11.NewAttribute(pkcs11.CKA_DERIVE, false),
		pkcs11.NewAttribute(pkcs11.CKA_MODIFIABLE, false),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, label),
		pkcs11.NewAttribute(pkcs11.CKA_ID, id),
	}
}

// errSideKeyGen: the token would not make a side key.
var errSideKeyGen = errors.New("the token would not make the key")

// sideKey finds or makes a side key of c's KEK. Under auto a key the
// token refuses to make is logged and left out (its profile is then not
// offered); a profile named by --pkcs11-wrap needs it.
func (s *Sealer) sideKey(c *conn, k sideKey, label, kekID string, create bool) (pkcs11.ObjectHandle, error) {
	h, err := findOrCreateSideKey(s.mod, c.loginSess, k, label, kekID, create)
	if errors.Is(err, errSideKeyGen) && s.cfg.Profile == ProfileAuto {
		s.log.Warn("HSM: the token would not make a key beside the KEK; its profile is not offered", "label", label, "err", err.Error())
		return 0, nil
	}
	return h, err
}

// findOrCreateSideKey finds a side key by label and the KEK's id (0 if
// there is none and create is false) or makes it, and checks that it is
// safe.
func findOrCreateSideKey(mod Module, sh pkcs11.SessionHandle, k sideKey, label, kekID string, create bool) (pkcs11.ObjectHandle, error) {
	id, _ := hex.DecodeString(kekID)
	objs, err := findByLabel(mod, sh, label, id)
	if err != nil {
		return 0, err
	}
	var key pkcs11.ObjectHandle
	switch len(objs) {
	case 0:
		if !create {
			return 0, nil
		}
		gen := []*pkcs11.Mechanism{pkcs11.NewMechanism(k.gen, nil)}
		key, err = mod.GenerateKey(sh, gen, append(k.template(label, id), k.allowed()))
		switch rv(err) {
		case pkcs11.CKR_ATTRIBUTE_TYPE_INVALID, pkcs11.CKR_ATTRIBUTE_VALUE_INVALID, pkcs11.CKR_TEMPLATE_INCONSISTENT:
			// A token without CKA_ALLOWED_MECHANISMS (PKCS#11 2.40;
			// opencryptoki 3.8 has none): the key without the list.
			key, err = mod.GenerateKey(sh, gen, k.template(label, id))
		}
		if err != nil {
			return 0, fmt.Errorf("%w: generate the %s %q: %v", errSideKeyGen, k.name, label, err)
		}
	case 1:
		key = objs[0]
	default:
		return 0, fmt.Errorf("%w: more than one key is labelled %q", ErrKEK, label)
	}
	a, err := KEKAttributes(mod, sh, key)
	if err != nil {
		return 0, err
	}
	switch {
	case a.KeyType != k.keyType || a.ValueLen != 32:
		return 0, fmt.Errorf("%w: the %s %q is not a 256-bit key of the type kmsd makes", ErrKEK, k.name, label)
	case !a.Sensitive || a.Extractable || !a.AlwaysSensitive || !a.NeverExtractable || !a.Token:
		return 0, fmt.Errorf("%w: the %s %q is or was extractable, not sensitive or not a token object", ErrKEK, k.name, label)
	case !bytes.Equal(a.ID, id):
		// Left from another KEK: not this one's, so not used.
		return 0, nil
	}
	return key, nil
}
