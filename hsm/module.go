// Package hsm is the PKCS#11 kms.Sealer: envelope encryption under a
// non-extractable AES-256 key encryption key (KEK) held in an HSM.
package hsm

import (
	"errors"
	"fmt"

	"github.com/miekg/pkcs11"
)

// Module is the subset of *pkcs11.Ctx the sealer calls. It exists so tests
// can wrap the real module and inject faults; production code always talks
// to a real PKCS#11 library.
type Module interface {
	Initialize(opts ...pkcs11.InitializeOption) error
	Finalize() error
	Destroy()
	GetSlotList(tokenPresent bool) ([]uint, error)
	GetTokenInfo(slotID uint) (pkcs11.TokenInfo, error)
	GetMechanismList(slotID uint) ([]*pkcs11.Mechanism, error)
	InitToken(slotID uint, pin string, label string) error
	InitPIN(sh pkcs11.SessionHandle, pin string) error
	OpenSession(slotID uint, flags uint) (pkcs11.SessionHandle, error)
	CloseSession(sh pkcs11.SessionHandle) error
	GetSessionInfo(sh pkcs11.SessionHandle) (pkcs11.SessionInfo, error)
	Login(sh pkcs11.SessionHandle, userType uint, pin string) error
	Logout(sh pkcs11.SessionHandle) error
	CreateObject(sh pkcs11.SessionHandle, temp []*pkcs11.Attribute) (pkcs11.ObjectHandle, error)
	DestroyObject(sh pkcs11.SessionHandle, oh pkcs11.ObjectHandle) error
	GetAttributeValue(sh pkcs11.SessionHandle, o pkcs11.ObjectHandle, a []*pkcs11.Attribute) ([]*pkcs11.Attribute, error)
	FindObjectsInit(sh pkcs11.SessionHandle, temp []*pkcs11.Attribute) error
	FindObjects(sh pkcs11.SessionHandle, max int) ([]pkcs11.ObjectHandle, bool, error)
	FindObjectsFinal(sh pkcs11.SessionHandle) error
	GenerateKey(sh pkcs11.SessionHandle, m []*pkcs11.Mechanism, temp []*pkcs11.Attribute) (pkcs11.ObjectHandle, error)
	EncryptInit(sh pkcs11.SessionHandle, m []*pkcs11.Mechanism, o pkcs11.ObjectHandle) error
	Encrypt(sh pkcs11.SessionHandle, message []byte) ([]byte, error)
	DecryptInit(sh pkcs11.SessionHandle, m []*pkcs11.Mechanism, o pkcs11.ObjectHandle) error
	Decrypt(sh pkcs11.SessionHandle, cipher []byte) ([]byte, error)
	SignInit(sh pkcs11.SessionHandle, m []*pkcs11.Mechanism, o pkcs11.ObjectHandle) error
	Sign(sh pkcs11.SessionHandle, message []byte) ([]byte, error)
	WrapKey(sh pkcs11.SessionHandle, m []*pkcs11.Mechanism, wrappingkey, key pkcs11.ObjectHandle) ([]byte, error)
	UnwrapKey(sh pkcs11.SessionHandle, m []*pkcs11.Mechanism, unwrappingkey pkcs11.ObjectHandle, wrappedkey []byte, a []*pkcs11.Attribute) (pkcs11.ObjectHandle, error)
}

var _ Module = (*pkcs11.Ctx)(nil)

// Start-up errors. Each stops kmsd with one line naming the cause.
var (
	ErrModule        = errors.New("cannot load the PKCS#11 module")
	ErrTokenNotFound = errors.New("no token with that label")
	ErrPINIncorrect  = errors.New("the HSM refused the PIN (not retried, so the token does not lock)")
	ErrPINLocked     = errors.New("the token's user PIN is locked")
	ErrMechanism     = errors.New("the token lacks a required mechanism")
	ErrKEK           = errors.New("the key encryption key is not as required")
	ErrKEKMissing    = errors.New("the key encryption key is missing (kmsd creates it only for a new data dir)")
	ErrSelfTest      = errors.New("HSM self-test failed")
	ErrClosed        = errors.New("the HSM sealer is closed")
)

// LoadModule loads a PKCS#11 library from path.
func LoadModule(path string) (Module, error) {
	if path == "" {
		return nil, fmt.Errorf("%w: no module path given", ErrModule)
	}
	ctx := pkcs11.New(path)
	if ctx == nil {
		return nil, fmt.Errorf("%w %s (missing file or not a PKCS#11 library)", ErrModule, path)
	}
	return ctx, nil
}

// rv extracts the PKCS#11 return value of err, or 0.
func rv(err error) uint {
	var e pkcs11.Error
	if errors.As(err, &e) {
		return uint(e)
	}
	return 0
}
