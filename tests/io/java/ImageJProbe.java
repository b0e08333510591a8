// What ImageJ's own TIFF opener (ij.io.Opener, behind Fiji's File > Open of a classic TIFF) makes of
// each file: one line of key=value per path. Run: java -Djava.awt.headless=true -cp ij.jar ImageJProbe.java FILE...
import ij.IJ;
import ij.ImagePlus;
import ij.io.Opener;
import ij.measure.Calibration;

public class ImageJProbe {
    public static void main(String[] args) {
        System.out.println("version=" + IJ.getVersion());
        for (String path : args) {
            ImagePlus imp = new Opener().openImage(path);
            if (imp == null) {
                System.out.println("path=" + path + " opened=false");
                continue;
            }
            Calibration cal = imp.getCalibration();
            int channels = imp.getNChannels(), slices = imp.getNSlices();
            imp.setPosition(channels, slices, 1);  // the last plane
            float last = imp.getProcessor().getf(imp.getWidth() - 1, imp.getHeight() - 1);
            System.out.println("path=" + path + " opened=true width=" + imp.getWidth() + " height=" + imp.getHeight()
                + " channels=" + channels + " slices=" + slices + " frames=" + imp.getNFrames()
                + " bitDepth=" + imp.getBitDepth() + " pixelWidth=" + cal.pixelWidth + " pixelHeight=" + cal.pixelHeight
                + " pixelDepth=" + cal.pixelDepth + " unit=" + cal.getUnit() + " last=" + last);
        }
    }
}
