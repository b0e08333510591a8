// What Bio-Formats (behind Fiji's Bio-Formats importer, QuPath, OMERO) makes of each file: one line of
// key=value per path. Run: java -cp bioformats_package.jar BioFormatsProbe.java FILE...
import loci.common.DebugTools;
import loci.formats.FormatTools;
import loci.formats.ImageReader;
import loci.formats.MetadataTools;
import loci.formats.meta.IMetadata;
import ome.units.quantity.Length;

public class BioFormatsProbe {
    static String length(Length size) {
        return size == null ? "none" : size.value().doubleValue() + "_" + size.unit().getSymbol();
    }

    public static void main(String[] args) throws Exception {
        DebugTools.setRootLevel("OFF");
        for (String path : args) {
            IMetadata meta = MetadataTools.createOMEXMLMetadata();
            ImageReader reader = new ImageReader();
            reader.setMetadataStore(meta);
            reader.setId(path);
            System.out.println("path=" + path + " format=" + reader.getFormat().replace(' ', '_')
                + " sizeX=" + reader.getSizeX() + " sizeY=" + reader.getSizeY() + " sizeZ=" + reader.getSizeZ()
                + " sizeC=" + reader.getSizeC() + " sizeT=" + reader.getSizeT()
                + " pixelType=" + FormatTools.getPixelTypeString(reader.getPixelType())
                + " physicalX=" + length(meta.getPixelsPhysicalSizeX(0))
                + " physicalY=" + length(meta.getPixelsPhysicalSizeY(0))
                + " physicalZ=" + length(meta.getPixelsPhysicalSizeZ(0)));
            reader.close();
        }
    }
}
